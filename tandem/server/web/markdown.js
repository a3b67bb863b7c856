// A small Markdown renderer for replies: fenced code, headings, lists, paragraphs,
// inline code, bold, italics and http(s) links. Every character of the input is
// HTML-escaped first, so a reply can never inject markup.
"use strict";

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
             .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(text) {
  const codes = [];
  let out = escapeHtml(text).replace(/`([^`\n]+)`/g, (_, code) => {
    codes.push(code);
    return "\u0000" + (codes.length - 1) + "\u0000";
  });
  out = out.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
           .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
           .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
                    '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return out.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[Number(i)] + "</code>");
}

function renderMarkdown(source) {
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  const html = [];
  let paragraph = [];
  let list = null;  // "ul" or "ol"
  const flushParagraph = () => {
    if (paragraph.length) html.push("<p>" + renderInline(paragraph.join("\n")).replace(/\n/g, "<br>") + "</p>");
    paragraph = [];
  };
  const closeList = () => {
    if (list) html.push("</" + list + ">");
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushParagraph();
      closeList();
      const body = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
      const lang = fence[1] ? ' class="language-' + escapeHtml(fence[1]) + '"' : "";
      html.push("<pre><code" + lang + ">" + escapeHtml(body.join("\n")) + "</code></pre>");
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushParagraph();
      closeList();
      const level = heading[1].length;
      html.push("<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">");
    } else if (bullet || numbered) {
      flushParagraph();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) {
        closeList();
        html.push("<" + kind + ">");
        list = kind;
      }
      html.push("<li>" + renderInline((bullet || numbered)[1]) + "</li>");
    } else if (line.trim() === "") {
      flushParagraph();
      closeList();
    } else {
      closeList();
      paragraph.push(line);
    }
  }
  flushParagraph();
  closeList();
  return html.join("");
}

if (typeof module !== "undefined") module.exports = { renderMarkdown, escapeHtml };
