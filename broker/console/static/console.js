// The console's live parts: every element with data-live is fetched again each second
// and swapped in; a signed-out answer (401) sends the browser back to the sign-in page.
"use strict";

const REFRESH_MS = 1000;

async function refresh(element) {
  try {
    const response = await fetch(element.dataset.live, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      window.location.assign("/admin");
      return;
    }
    if (response.ok) {
      const html = await response.text();
      if (html !== element.dataset.shown) {
        element.innerHTML = html;
        element.dataset.shown = html;
      }
    }
  } catch (error) {
    // The broker is restarting or the network blinked: the next round tries again.
  }
}

function live() {
  for (const element of document.querySelectorAll("[data-live]")) {
    if (!document.hidden) {
      refresh(element);
    }
  }
}

if (document.querySelector("[data-live]")) {
  setInterval(live, REFRESH_MS);
}
