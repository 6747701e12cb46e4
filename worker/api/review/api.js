// The papscan API as the review page uses it: every call carries the bearer token the
// reviewer pasted, kept in this tab's session storage only (gone when the tab closes).

const TOKEN_KEY = "papscan.token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
}

export async function call(path, { json: body, method } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) ?? ""}` };
  const init = { method: method ?? (body === undefined ? "GET" : "POST"), headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const detail = await response.json().then((b) => b.detail, () => response.statusText);
    if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    throw new ApiError(response.status, detail || `HTTP ${response.status}`);
  }
  return response;
}

export const getJson = async (path, options) => (await call(path, options)).json();

// An image from the API as an object URL (an <img src> cannot send the token).
export async function imageUrl(path) {
  return URL.createObjectURL(await (await call(path)).blob());
}

// The sign-in form and the error bar every page has, after its header.
function frame() {
  const form = element(
    "form", { id: "sign-in", hidden: true },
    element("label", { htmlFor: "token" }, "Your papscan token"),
    element("input", {
      id: "token", name: "token", type: "password", autocomplete: "off", required: true,
      placeholder: "from: papscan token create YOUR-NAME",
    }),
    element("button", { type: "submit" }, "Sign in"),
    element("p", { className: "message" }),
  );
  document.querySelector("header").after(form, element("p", { id: "error", role: "alert", hidden: true }));
  return form;
}

// Run `start` once a token works: the stored one, or one the reviewer pastes.
export async function signedIn(start) {
  const form = frame();
  const message = form.querySelector(".message");
  const tryToken = async () => {
    try {
      await call("/api/worklist?limit=1");
    } catch (error) {
      if (error.status !== 401) throw error;
      return false;
    }
    form.hidden = true;
    document.body.classList.add("signed-in");
    await start();
    return true;
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, form.elements.token.value.trim());
    form.elements.token.value = "";
    if (!(await tryToken())) message.textContent = "That token was not accepted.";
  });
  document.getElementById("sign-out")?.addEventListener("click", signOut);
  if (!sessionStorage.getItem(TOKEN_KEY) || !(await tryToken())) {
    form.hidden = false;
    form.elements.token.focus();
  }
}

// Show an error where the page can (one sentence from the API, or the JS error).
export function showError(error) {
  const bar = document.getElementById("error");
  bar.textContent = error instanceof ApiError ? error.message : `Something failed: ${error}`;
  bar.hidden = false;
}

// A CSS class per slide category, for its badge colour ("cat-nilm", "cat-hsil", ...).
export const categoryClass = (category) =>
  category ? `cat-${category.split(" ")[0].replace(/[^A-Za-z-]/g, "").toLowerCase()}` : "";

export const percent = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)} %`);

export function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset" || key === "style") Object.assign(node[key], value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child != null));
  return node;
}
