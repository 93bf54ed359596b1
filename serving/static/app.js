// The search page: plain JS against the JSON endpoints of serving/search.py (no build step).
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function render(hits, took) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    // ids are int64: JSON numbers lose precision in JS, so take the id from the server-built URL
    card.dataset.id = hit.similar_url.split("/").pop();
    card.title = "click: find images similar to this one";
    const img = document.createElement("img");
    img.src = hit.thumb_url;
    img.alt = hit.path;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = hit.score.toFixed(4);
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${hit.path} · ${hit.source}`;
    card.append(img, score, meta);
    card.addEventListener("click", () => similar(hit.similar_url, hit.path));
    grid.append(card);
  }
  setStatus(`${hits.length} results${took !== undefined ? ` in ${took} ms` : ""}`);
}

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const reason = body.error || JSON.stringify(body.detail || body) || response.statusText;
    throw new Error(`${response.status}: ${reason}`);
  }
  return body;
}

function common() {
  return { k: Number($("k").value) || 12, source: $("source").value || null };
}

async function search(imageB64 = null) {
  const text = $("query").value.trim();
  const negative = $("negative").value.trim();
  if (!text && !imageB64) {
    setStatus("type something to search for, or drop an image", true);
    return;
  }
  setStatus("searching…");
  try {
    const body = await call("search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: text || null, negative: negative || null, image: imageB64, ...common() }),
    });
    render(body.hits, body.took_ms);
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function similar(url, path) {
  setStatus(`finding images similar to ${path}…`);
  const { k, source } = common();
  const params = new URLSearchParams({ k });
  if (source) params.set("source", source);
  try {
    const body = await call(`${url}?${params}`);
    render(body.hits);
    $("status").textContent = `similar to ${path}: ${body.hits.length} results`;
  } catch (err) {
    setStatus(err.message, true);
  }
}

function searchWithFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => search(String(reader.result).split(",", 2)[1]);
  reader.readAsDataURL(file);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
$("file").addEventListener("change", (event) => searchWithFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchWithFile(event.dataTransfer.files[0]);
});
