// A small Markdown renderer for model answers. Safety first: every piece of the source is
// HTML-escaped before any markup is added, and the only tags produced are the fixed ones below;
// links are kept only for http(s) and mailto URLs. Supports fenced and inline code, headings,
// bold, italic, strike-through, links, bullet and numbered lists, block quotes, rules, paragraphs.
(function () {
  "use strict";

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Formatting inside a line of already-escaped text.
  function format(escaped) {
    return escaped
      .replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) =>
        /^(https?:\/\/|mailto:)/i.test(url)
          ? `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`
          : whole)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~([^~\n]+)~~/g, "<del>$1</del>");
  }

  // Inline code spans are cut out first so that nothing inside them is formatted.
  function inline(raw) {
    let out = "";
    let last = 0;
    const code = /`([^`\n]+)`/g;
    let m;
    while ((m = code.exec(raw)) !== null) {
      out += format(escapeHtml(raw.slice(last, m.index))) + "<code>" + escapeHtml(m[1]) + "</code>";
      last = m.index + m[0].length;
    }
    return out + format(escapeHtml(raw.slice(last)));
  }

  function renderMarkdown(source) {
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    const html = [];
    let paragraph = [];
    let list = null; // {tag, items}
    let quote = [];

    const flushParagraph = () => {
      if (paragraph.length) html.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
      paragraph = [];
    };
    const flushList = () => {
      if (list) html.push(`<${list.tag}>` + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + `</${list.tag}>`);
      list = null;
    };
    const flushQuote = () => {
      if (quote.length) html.push("<blockquote>" + renderMarkdown(quote.join("\n")) + "</blockquote>");
      quote = [];
    };
    const flushAll = () => { flushParagraph(); flushList(); flushQuote(); };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushAll();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : "";
        html.push(`<pre><code${lang}>` + escapeHtml(body.join("\n")) + "</code></pre>");
        continue;
      }
      let m;
      if ((m = line.match(/^\s{0,3}>\s?(.*)$/))) { flushParagraph(); flushList(); quote.push(m[1]); continue; }
      flushQuote();
      if (!line.trim()) { flushParagraph(); flushList(); continue; }
      if ((m = line.match(/^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/))) {
        flushAll();
        html.push(`<h${m[1].length}>` + inline(m[2]) + `</h${m[1].length}>`);
        continue;
      }
      if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) { flushAll(); html.push("<hr>"); continue; }
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d{1,9}[.)]\s+(.*)$/);
      if (bullet || numbered) {
        const tag = bullet ? "ul" : "ol";
        flushParagraph();
        if (list && list.tag !== tag) flushList();
        if (!list) list = { tag, items: [] };
        list.items.push((bullet || numbered)[1]);
        continue;
      }
      if (list && /^\s{2,}\S/.test(line)) { list.items[list.items.length - 1] += " " + line.trim(); continue; }
      flushList();
      paragraph.push(line);
    }
    flushAll();
    return html.join("\n");
  }

  window.escapeHtml = escapeHtml;
  window.renderMarkdown = renderMarkdown;
})();
