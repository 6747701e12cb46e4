// One slide: the viewer with cell boxes over the DeepZoom tiles, the summary, the cells
// to review (a click flies the viewer to the cell), cell verdicts, "why this cell", and
// the reviewer's decision.
import { call, categoryClass, element, getJson, imageUrl, percent, showError, signedIn } from "./api.js";
import { Viewer } from "./viewer.js";

const scanId = Number(new URLSearchParams(location.search).get("scan"));
const base = `/api/scans/${scanId}`;
const REGION_SCALE = 1 / 8; // zoomed in further than this, every cell in view is boxed
const REGION_LIMIT = 5000;

let viewer;
let colours = {};
let reviewBoxes = [];

const box = (cell) => ({
  id: cell.id, x: cell.x, y: cell.y, w: cell.w, h: cell.h,
  colour: colours[cell.label] ?? "#888", rank: cell.review_rank,
});

async function tile(level, col, row) {
  const blob = await (await call(`${base}/deepzoom/${level}/${col}_${row}.jpeg`)).blob();
  return createImageBitmap(blob);
}

// Every cell in view once zoomed in; only the cells to review when zoomed out.
let regionTimer = 0;
function showCellsInView(view, cssScale) {
  clearTimeout(regionTimer);
  if (cssScale < REGION_SCALE) {
    viewer.setBoxes(reviewBoxes);
    return;
  }
  regionTimer = setTimeout(async () => {
    const x = Math.max(0, Math.floor(view.x));
    const y = Math.max(0, Math.floor(view.y));
    const w = Math.min(viewer.info.width - x, Math.ceil(view.w));
    const h = Math.min(viewer.info.height - y, Math.ceil(view.h));
    if (w < 1 || h < 1) return;
    const page = await getJson(`${base}/cells?region=${x},${y},${w},${h}&limit=${REGION_LIMIT}`);
    const byId = new Map(page.cells.map((c) => [c.id, box(c)]));
    for (const b of reviewBoxes) byId.set(b.id, b);
    viewer.setBoxes([...byId.values()]);
  }, 250);
}

function summary(scan) {
  const counts = Object.entries(scan.class_counts ?? {}).sort(
    (a, b) => Object.keys(colours).indexOf(a[0]) - Object.keys(colours).indexOf(b[0]),
  );
  const name = scan.barcode || scan.slide_path.split(/[\\/]/).pop();
  document.getElementById("slide-name").textContent = name;
  document.title = `papscan · ${name}`;
  document.getElementById("headline").replaceChildren(
    scan.category ? element("span", { className: `badge ${categoryClass(scan.category)}` }, scan.category) : scan.status,
    ` P(abnormal) ${percent(scan.score)}`,
  );
  const row = (label, ...value) => [element("dt", {}, label), element("dd", {}, ...value)];
  document.getElementById("summary").replaceChildren(
    element("h2", {}, "Result"),
    element(
      "dl", {},
      ...row("Status", scan.status + (scan.error ? `: ${scan.error}` : "")),
      ...row("Adequacy", scan.adequacy ?? "–",
        scan.squamous_estimate != null ? ` (≈${Math.round(scan.squamous_estimate).toLocaleString()} squamous cells)` : ""),
      ...row("QC", scan.qc_flags.length ? element("ul", { className: "flags" }, ...scan.qc_flags.map((f) => element("li", {}, f))) : "no flags"),
      ...row("Cells", `${(scan.cell_count ?? 0).toLocaleString()} in ${(scan.roi_count ?? 0).toLocaleString()} ROIs`),
      ...row("Preparation", scan.preparation ?? scan.slide_preparation ?? "–"),
      ...row("Models", Object.entries(scan.model_versions).map(([m, v]) => `${m} v${v}`).join(", ") || "–"),
      ...row("Finished", scan.finished_at ? new Date(scan.finished_at).toLocaleString() : "–"),
      ...(scan.notes.length ? row("Notes", element("ul", { className: "notes" }, ...scan.notes.map((n) => element("li", {}, n)))) : []),
    ),
    element(
      "table", { className: "counts" },
      ...counts.map(([label, n]) => element(
        "tr", {},
        element("td", {}, element("span", { className: "swatch", style: { background: colours[label] ?? "#888" } }), label),
        element("td", { className: "num" }, n.toLocaleString()),
      )),
    ),
  );
}

function gallery(cells, verdicts) {
  const cards = cells.map((cell) => {
    const img = element("img", { alt: `cell ${cell.review_rank}: ${cell.label}`, width: 96, height: 96 });
    const mark = (verdict) => element("button", {
      type: "button", className: `verdict ${verdict}`, title: verdict.replace("_", " "),
      onclick: (e) => { e.stopPropagation(); recordVerdict(cell, verdict, card).catch(showError); },
    }, verdict === "true_positive" ? "✓" : "✗");
    const card = element(
      "figure",
      { className: "cell-card", tabIndex: 0, dataset: { cell: cell.id, verdict: verdicts.get(cell.id) ?? "" } },
      img,
      element(
        "figcaption", {},
        element("b", {}, `${cell.review_rank}. `),
        element("span", { className: "swatch", style: { background: colours[cell.label] ?? "#888" } }),
        `${cell.label} ${percent(cell.score)}`,
      ),
      element(
        "div", { className: "card-actions" }, mark("true_positive"), mark("false_positive"),
        element("button", {
          type: "button", className: "why", title: "Why this cell",
          onclick: (e) => { e.stopPropagation(); why(cell).catch(showError); },
        }, "why?"),
      ),
    );
    const focus = () => {
      document.querySelectorAll(".cell-card.active").forEach((c) => c.classList.remove("active"));
      card.classList.add("active");
      viewer?.select(cell.id);
      viewer?.flyTo(cell);
    };
    card.addEventListener("click", focus);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") focus(); });
    Object.assign(card, { focusCell: focus, markCell: (verdict) => recordVerdict(cell, verdict, card), whyCell: () => why(cell) });
    imageUrl(`${base}/cells/${cell.id}/image`).then((url) => { img.src = url; }, () => img.classList.add("missing"));
    return card;
  });
  const panel = document.getElementById("gallery");
  panel.replaceChildren(...(cards.length ? cards : [element("p", {}, "No cells marked for review.")]));
  panel.dataset.cells = cards.length;
}

// The keys a reviewer works the gallery with, without the mouse (not while typing).
const KEYS = {
  ArrowRight: (cards, i) => cards[Math.min(i + 1, cards.length - 1)].focusCell(),
  j: (cards, i) => KEYS.ArrowRight(cards, i),
  ArrowLeft: (cards, i) => cards[Math.max(i - 1, 0)].focusCell(),
  k: (cards, i) => KEYS.ArrowLeft(cards, i),
  t: (cards, i) => i >= 0 && cards[i].markCell("true_positive"),
  f: (cards, i) => i >= 0 && cards[i].markCell("false_positive"),
  w: (cards, i) => i >= 0 && cards[i].whyCell(),
  h: () => viewer?.home(),
};

function listenForKeys() {
  document.addEventListener("keydown", (event) => {
    const action = KEYS[event.key];
    if (!action || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("input, textarea, select")) return;
    const cards = [...document.querySelectorAll(".cell-card")];
    if (!cards.length) return;
    event.preventDefault();
    Promise.resolve(action(cards, cards.findIndex((c) => c.classList.contains("active")))).catch(showError);
  });
}

async function recordVerdict(cell, verdict, card) {
  await call(`${base}/cells/${cell.id}/review`, { json: { verdict } });
  card.dataset.verdict = verdict;
}

async function why(cell) {
  const panel = document.getElementById("why");
  const text = document.getElementById("why-text");
  const image = document.getElementById("why-image");
  panel.hidden = false;
  image.removeAttribute("src");
  text.textContent = "Computing the heat map (a few seconds on a CPU)…";
  const answer = await getJson(`${base}/cells/${cell.id}/why`);
  image.src = await imageUrl(answer.image);
  text.textContent =
    `Integrated gradients of the cell classifier toward ${answer.target} (P ${percent(answer.probability)}); ` +
    `ROI attention ${answer.attention.toFixed(3)}; ${answer.steps} steps, completeness gap ${answer.convergence_delta.toFixed(3)}. ` +
    `The ${answer.baseline} baseline scores ${percent(answer.output_at_baseline)} for ${answer.target}: ` +
    `the map shows what moves the cell ${percent(Math.abs(answer.output_difference))} from it.`;
}

function showDecision(history) {
  const current = history.current;
  document.getElementById("current-decision").textContent = current
    ? `${current.agrees ? "Agreed" : "Disagreed"}${current.category ? ` (${current.category})` : ""}` +
      ` by ${current.reviewer}, ${new Date(current.created_at).toLocaleString()}` +
      `${current.note ? `: “${current.note}”` : ""}` +
      (history.reviews.length > 1 ? ` · ${history.reviews.length - 1} earlier` : "")
    : "Not reviewed yet.";
  document.body.dataset.reviewed = current ? "yes" : "no";
}

function showSlide(info) {
  viewer = new Viewer(document.getElementById("viewer"), info, tile);
  window.papscanViewer = viewer; // for the browser test and the console
  viewer.onViewChange = showCellsInView;
  viewer.setBoxes(reviewBoxes);
  const centre = () => [viewer.canvas.width / 2, viewer.canvas.height / 2];
  document.getElementById("zoom-home").onclick = () => viewer.home();
  document.getElementById("zoom-in").onclick = () => viewer.zoomAt(2, ...centre());
  document.getElementById("zoom-out").onclick = () => viewer.zoomAt(0.5, ...centre());
}

async function start() {
  if (!scanId) throw new Error("no scan id in the address (slide.html?scan=ID)");
  const words = await getJson("/api/vocabulary");
  colours = Object.fromEntries(words.cell_classes.map((c) => [c.name, c.colour]));
  document.getElementById("legend").replaceChildren(...words.cell_classes.map((c) =>
    element("span", { className: "legend-item" }, element("span", { className: "swatch", style: { background: c.colour } }), c.name)));
  const form = document.getElementById("decision-form");
  form.elements.category.append(...words.categories.map((c) => element("option", { value: c }, c)));

  const [scan, review, history] = await Promise.all([
    getJson(base),
    getJson(`${base}/cells?review_rank_max=1000&limit=1000`),
    getJson(`${base}/reviews`),
  ]);
  summary(scan);
  const cells = review.cells.sort((a, b) => a.review_rank - b.review_rank);
  reviewBoxes = cells.map(box);
  // A slide whose file is gone or changed still has its result, gallery and decision;
  // only the viewer says why it cannot show the slide.
  try {
    showSlide(await getJson(`${base}/deepzoom`));
  } catch (error) {
    const panel = document.getElementById("viewer");
    panel.replaceChildren(element("p", { className: "viewer-message" }, error.message));
    panel.dataset.unavailable = error.status ?? "error";
  }
  document.getElementById("why-close").onclick = () => { document.getElementById("why").hidden = true; };

  const verdicts = new Map();
  for (const r of [...history.cell_reviews].reverse()) verdicts.set(r.cell_id, r.verdict); // newest wins
  gallery(cells, verdicts);
  listenForKeys();
  showDecision(history);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    try {
      await call(`${base}/review`, {
        json: { agrees: data.get("agrees") === "true", category: data.get("category") || null, note: data.get("note") || null },
      });
      form.reset();
      showDecision(await getJson(`${base}/reviews`));
    } catch (error) {
      showError(error);
    }
  });
  document.body.dataset.loaded = "slide";
}

signedIn(start).catch(showError);
