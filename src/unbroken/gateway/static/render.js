// Markdown for model output: marked to HTML, highlight.js for code, DOMPurify on everything
// before it reaches the DOM. Streaming re-renders only the blocks that changed (in practice
// the last one), so finished paragraphs keep their nodes: no flicker, selections survive.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0];
      let html;
      try {
        html =
          language && hljs.getLanguage(language)
            ? hljs.highlight(text, { language, ignoreIllegals: true }).value
            : hljs.highlightAuto(text).value;
      } catch (_) {
        html = escapeHtml(text);
      }
      const label = language ? ` data-lang="${escapeHtml(language)}"` : "";
      return `<pre${label}><code class="hljs">${html}</code></pre>\n`;
    },
  },
});

const purifier = DOMPurify(window);
purifier.addHook("afterSanitizeAttributes", (node) => {
  // Links open elsewhere and never tell the target where they came from.
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});
const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math"],
  FORBID_ATTR: ["style", "id", "name"],
  RETURN_DOM_FRAGMENT: true,
};

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Sanitized DOM for a Markdown string. */
export function renderMarkdown(source) {
  return purifier.sanitize(marked.parse(source), PURIFY);
}

function renderTokens(tokens, links) {
  const list = tokens.slice();
  list.links = links;
  return purifier.sanitize(marked.parser(list), PURIFY);
}

/**
 * A Markdown view over a growing source. `update(source)` re-lexes the whole text (fast) but
 * rebuilds only the top-level blocks whose source changed.
 */
export class MarkdownView {
  constructor(element) {
    this.element = element;
    this.blocks = []; // {raw, node}
  }

  update(source) {
    const tokens = marked.lexer(source);
    const links = tokens.links;
    let i = 0;
    for (const token of tokens) {
      const block = this.blocks[i];
      if (block && block.raw === token.raw) {
        i++;
        continue;
      }
      const node = document.createElement("div");
      node.className = "md-block";
      node.append(renderTokens([token], links));
      if (block) {
        block.node.replaceWith(node);
        this.blocks[i] = { raw: token.raw, node };
      } else {
        this.element.append(node);
        this.blocks.push({ raw: token.raw, node });
      }
      i++;
    }
    for (const stale of this.blocks.splice(i)) stale.node.remove();
  }

  clear() {
    this.blocks = [];
    this.element.replaceChildren();
  }
}
