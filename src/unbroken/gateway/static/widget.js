// The embeddable chat widget: one tag on a shop's page,
//
//   <script src="https://chat.example.com/widget.js" data-token-url="/chat-token" async></script>
//
// puts a launcher button in the corner that opens the chat in a panel. Everything lives in an
// open shadow root (the shop's CSS does not leak in; `UnbrokenWidget.shadowRoot` reaches the
// same selectors as the page). The shop's backend mints a short-lived token at
// `data-token-url` (JSON `{"token": ...}` or the bare token); shoppers never see a gateway key.
(() => {
  const script = document.currentScript;
  if (!script || window.UnbrokenWidget) return;
  const base = new URL(script.src, document.baseURI).origin;
  const data = script.dataset;
  let token = null;
  let expires = 0;

  async function getToken() {
    if (token && expires - Date.now() / 1000 > 30) return token;
    if (!data.tokenUrl) throw new Error("the widget has no data-token-url to get a token from");
    const response = await fetch(data.tokenUrl, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error(`the shop's token endpoint answered ${response.status}`);
    const type = response.headers.get("content-type") || "";
    token = type.includes("json") ? (await response.json()).token : (await response.text()).trim();
    try {
      const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      expires = JSON.parse(atob(payload)).exp || 0;
    } catch (_) {
      expires = 0;
    }
    return token;
  }

  const host = document.createElement("div");
  host.id = "unbroken-widget";
  const shadow = host.attachShadow({ mode: "open" });
  const style = (href, media) => {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = `${base}${href}`;
    if (media) link.media = media;
    return link;
  };
  const panel = document.createElement("div");
  panel.className = "ub-panel";
  panel.id = "ub-panel";
  panel.hidden = true;
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", data.title || "Chat");
  const launcher = document.createElement("button");
  launcher.type = "button";
  launcher.className = "ub-launcher";
  launcher.setAttribute("aria-label", "Open chat");
  launcher.setAttribute("aria-expanded", "false");
  launcher.setAttribute("aria-controls", "ub-panel");
  launcher.textContent = "💬";
  shadow.append(
    style("/static/vendor/hljs-github.min.css", "(prefers-color-scheme: light)"),
    style("/static/vendor/hljs-github-dark.min.css", "(prefers-color-scheme: dark)"),
    style("/static/chat.css"),
    panel,
    launcher,
  );

  const api = { chat: null, shadowRoot: shadow, open, close };
  let loading = null;

  async function open() {
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    launcher.setAttribute("aria-label", "Close chat");
    if (!loading) {
      loading = import(`${base}/static/chat.js`).then(({ mountChat }) => {
        api.chat = mountChat(panel, { base, mode: "widget", getToken });
        const closer = document.createElement("button");
        closer.type = "button";
        closer.className = "ub-close";
        closer.setAttribute("aria-label", "Close chat");
        closer.textContent = "×";
        closer.addEventListener("click", close);
        api.chat.app.querySelector(".ub-header").append(closer);
        if (data.title) api.chat.titleEl.textContent = data.title;
        return api.chat.ready;
      });
    }
    await loading;
    api.chat.input.focus();
  }

  function close() {
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
    launcher.setAttribute("aria-label", "Open chat");
    launcher.focus();
  }

  launcher.addEventListener("click", () => (panel.hidden ? open() : close()));
  panel.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !(api.chat && api.chat.active)) close();
  });
  window.UnbrokenWidget = api;
  const mount = () => {
    document.body.append(host);
    if (data.open === "true") open();
  };
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);
})();
