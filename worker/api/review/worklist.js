// The morning worklist: slides needing a person first (failed and unsatisfactory, then by
// suspicion), as the API ranks them; a row opens the slide.
import { categoryClass, element, getJson, percent, showError, signedIn } from "./api.js";

const form = document.getElementById("filters");
const body = document.querySelector("#worklist tbody");

const fileName = (path) => path.split(/[\\/]/).pop();

function row(item, rank) {
  const href = `slide.html?scan=${item.scan_id}`;
  const open = () => { location.href = href; };
  const tr = element(
    "tr",
    { className: `status-${item.status}`, tabIndex: 0, dataset: { scan: item.scan_id } },
    element("td", { className: "num" }, String(rank)),
    element("td", {}, element("a", { href, title: item.slide_path }, item.barcode || fileName(item.slide_path))),
    element("td", {}, item.category ? element("span", { className: `badge ${categoryClass(item.category)}` }, item.category) : "–"),
    element("td", { className: "num" }, percent(item.score)),
    element("td", { className: item.adequacy === "unsatisfactory" ? "warn" : "" }, item.adequacy ?? "–"),
    element(
      "td",
      { className: item.qc_flags.length ? "warn" : "", title: item.qc_flags.join("\n") },
      item.qc_flags.length ? `⚠ ${item.qc_flags.length}` : "–",
    ),
    element("td", { title: item.error ?? "" }, item.status),
    element("td", {}, item.finished_at ? new Date(item.finished_at).toLocaleString() : "–"),
    element("td", {}, item.reviewed ? "✓" : ""),
  );
  tr.addEventListener("click", (event) => { if (event.target.tagName !== "A") open(); });
  tr.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
  return tr;
}

const PAGE = 500;
let shown = [];

async function load(more = false) {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (value) params.append(key, value);
  history.replaceState(null, "", params.size ? `?${params}` : location.pathname);
  if (!more) shown = [];
  params.set("limit", PAGE);
  params.set("offset", shown.length);
  const page = await getJson(`/api/worklist?${params}`);
  const rows = page.map((item, i) => row(item, shown.length + i + 1));
  if (more) body.append(...rows);
  else body.replaceChildren(...rows);
  shown = shown.concat(page);
  document.getElementById("more").hidden = page.length < PAGE;
  const open = shown.filter((item) => !item.reviewed && item.status === "done").length;
  document.getElementById("summary").textContent =
    `${shown.length}${page.length < PAGE ? "" : "+"} slide${shown.length === 1 ? "" : "s"}; ` +
    `${open} done and not reviewed.`;
  document.body.dataset.loaded = "worklist";
}

async function start() {
  const words = await getJson("/api/vocabulary");
  for (const [name, values] of [["status", words.statuses], ["category", words.categories]]) {
    form.elements[name].append(...values.map((v) => element("option", { value: v }, v)));
  }
  const wanted = new URLSearchParams(location.search);
  for (const [key, value] of wanted) if (form.elements[key]) form.elements[key].value = value;
  form.addEventListener("change", () => load().catch(showError));
  document.getElementById("more").addEventListener("click", () => load(true).catch(showError));
  await load();
}

signedIn(start).catch(showError);
