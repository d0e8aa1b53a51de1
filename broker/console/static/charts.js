// The usage charts (uPlot): the admin API's data, drawn again every few seconds.
"use strict";

const CHART_REFRESH_MS = 2000;
const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#64748b"];
const charts = {};

function seriesOf(data, key) {
  if (key === "outcomes") {
    return { requests: data.requests, errors: data.errors };
  }
  return data[key];
}

function draw(element, times, named) {
  const names = Object.keys(named);
  const signature = names.join("\u0000");
  const values = [times, ...names.map((name) => named[name])];
  const chart = charts[element.id];
  element.dataset.total = String(names.reduce((sum, name) => sum + named[name].reduce((a, b) => a + b, 0), 0));
  if (chart && chart.signature === signature) {
    chart.plot.setData(values);
    return;
  }
  if (chart) {
    chart.plot.destroy();
  }
  const options = {
    width: element.clientWidth || 600,
    height: 220,
    padding: [12, 24, 0, 0],  // room for the last time label
    series: [{}, ...names.map((name, i) => ({ label: name, stroke: COLORS[i % COLORS.length], width: 2 }))],
    legend: { live: false },
    tzDate: (seconds) => uPlot.tzDate(new Date(seconds * 1000), "Etc/UTC"),  // UTC, like every table
    axes: [{ space: 70 }, { size: 60 }],
    scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
  };
  charts[element.id] = { signature, plot: new uPlot(options, values, element) };
}

async function update(container) {
  try {
    const response = await consoleFetch(container.dataset.source);  // (console.js)
    if (!response || !response.ok) {
      return;
    }
    const data = await response.json();
    for (const element of container.querySelectorAll("[data-chart]")) {
      draw(element, data.times, seriesOf(data, element.dataset.chart));
    }
  } catch (error) {
    // Tried again on the next round.
  }
}

for (const container of document.querySelectorAll("[data-source]")) {
  update(container);
  setInterval(() => update(container), CHART_REFRESH_MS);
}
