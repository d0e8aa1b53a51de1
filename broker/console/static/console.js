// The console's live parts: every element with data-live is fetched again each second
// and swapped in; a signed-out answer (401) sends the browser back to the sign-in page.
"use strict";

const REFRESH_MS = 1000;
const shown = new WeakMap();  // what each live element shows now: unchanged HTML is not swapped in

// A console fetch: null when signed out (the browser is then sent to the sign-in page).
async function consoleFetch(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/admin");
    return null;
  }
  return response;
}

async function refresh(element) {
  try {
    const response = await consoleFetch(element.dataset.live);
    if (response && response.ok) {
      const html = await response.text();
      if (html !== shown.get(element)) {
        element.innerHTML = html;
        shown.set(element, html);
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
