// The admin page: sign-in, then one view per hash route (#/overview, #/models, #/jobs, #/access).
import { current, signIn, signOut } from "./api.js";
import { errorBox } from "./ui.js";
import * as overview from "./overview.js";
import * as models from "./models.js";
import * as jobs from "./jobs.js";
import * as access from "./access.js";

const VIEWS = { overview, models, jobs, access };
let active = null; // {stop()} of the view on screen

function $(id) {
  return document.getElementById(id);
}

function showSignIn() {
  if (active && active.stop) active.stop();
  active = null;
  $("view").replaceChildren();
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  document.body.dataset.screen = "signin";
  $("signin-form").querySelector("input[name=username]").focus();
}

async function route() {
  if (!current()) return showSignIn();
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("who-email").textContent = current().email;
  const [, name, ...rest] = (location.hash || "#/overview").split("/");
  const view = VIEWS[name] ? name : "overview";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === view);
  if (active && active.stop) active.stop();
  active = null;
  // A fresh container per visit: a view still loading when the operator moves on renders into a
  // detached box (never over the next view), and its polling stops once the box is disconnected.
  const box = document.createElement("div");
  $("view").replaceChildren(box);
  document.body.dataset.screen = view;
  try {
    const mounted = await VIEWS[view].mount(box, rest.map(decodeURIComponent));
    if (box.isConnected) active = mounted;
    else if (mounted && mounted.stop) mounted.stop();
  } catch (err) {
    box.replaceChildren(errorBox(err));
  }
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  $("signin-error").textContent = "";
  try {
    await signIn(String(form.get("username")), String(form.get("password")));
    ev.target.reset();
    if (!location.hash || location.hash === "#/") location.hash = "#/overview";
    await route();
  } catch (err) {
    $("signin-error").textContent = err.status === 401 ? "wrong email or password" : err.message;
  }
});

$("sign-out").addEventListener("click", () => signOut());
window.addEventListener("aistack:signed-out", showSignIn);
window.addEventListener("hashchange", route);
route();
