// A small Markdown renderer for model output: fenced code blocks, inline code, bold, italic,
// headings, lists, block quotes, rules and http(s) links.
//
// Safety model: the whole input is HTML-escaped FIRST, and every tag in the output is written by
// this file, never copied from the input. Model text therefore cannot inject markup, attributes or
// script, whatever it contains. Links are only made for http(s) URLs; their href is already-escaped
// text inside double quotes, and escaping turns `"` into `&quot;`, so it cannot close the attribute.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Inline code spans are swapped out for placeholders while emphasis and links are applied, so that
// `*a*` inside backticks stays literal. NUL never survives in the input (it is stripped), so the
// placeholder cannot be forged by the model.
const HOLD = "\u0000";

// A URL's characters: no white space, no (escaped) quote or angle bracket, and parentheses only in
// balanced pairs, one level deep, as in https://en.wikipedia.org/wiki/Rust_(programming_language).
const URL_CHAR = String.raw`(?:(?!&quot;|&#39;|&lt;|&gt;)[^\s()])`;
const URL_BODY = String.raw`(?:${URL_CHAR}|\(${URL_CHAR}*\))+`;
const LINK = new RegExp(String.raw`\[([^\]\n]+)\]\((https?:\/\/${URL_BODY})\)`, "g");
const BARE_URL = new RegExp(String.raw`\bhttps?:\/\/${URL_BODY}`, "g");

function renderInline(escaped) {
  const held = [];
  const hold = (html) => `${HOLD}${held.push(html) - 1}${HOLD}`;

  let s = escaped.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => hold(`<code>${code}</code>`));

  // [label](http://...): anything but http(s) stays literal text.
  s = s.replace(LINK, (_, label, url) =>
    hold(`<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${renderEmphasis(label)}</a>`));
  // Bare URLs become links too. Trailing punctuation (the end of a sentence) is left out of them.
  s = s.replace(BARE_URL, (match) => {
    const url = match.replace(/[.,:;!?\]]+$/, "");
    return hold(`<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${url}</a>`)
      + match.slice(url.length);
  });

  s = renderEmphasis(s);
  // Held pieces can hold others (a code span in a link's label), hence the loop; each pass takes
  // out one level, and there are at most two.
  const placeholder = new RegExp(`${HOLD}(\\d+)${HOLD}`, "g");
  for (let pass = 0; pass < 3 && s.includes(HOLD); pass++) s = s.replace(placeholder, (_, i) => held[Number(i)]);
  return s;
}

function renderEmphasis(s) {
  return s
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([^~\n]*?\S)~~/g, "<del>$1</del>");
}

// Block patterns, matched against already-escaped lines (so `>` is `&gt;`).
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}&gt;\s?(.*)$/;

export function renderMarkdown(source) {
  const lines = escapeHtml(String(source ?? "").replace(/\u0000/g, "").replace(/\r\n?/g, "\n")).split("\n");
  return renderBlocks(lines);
}

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === "") {
      i++;
    } else if (FENCE.test(line)) {
      let html;
      [html, i] = renderFence(lines, i);
      out.push(html);
    } else if ((m = HEADING.exec(line))) {
      const level = m[1].length;
      out.push(`<h${level}>${renderInline(m[2])}</h${level}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
      out.push(`<blockquote>${renderBlocks(body)}</blockquote>`);
    } else if (LIST_ITEM.test(line)) {
      i = renderList(lines, i, out);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i]); i++) para.push(lines[i].trim());
      // Chat answers mean their line breaks, so they are kept rather than folded into spaces.
      out.push(`<p>${para.map(renderInline).join("<br>")}</p>`);
    }
  }
  return out.join("");
}

// The fenced code block that opens at lines[start], and the index of the line after it. The fence's
// own indentation (inside a list item, say) is taken off each line of its body. A fence still open
// at the end (mid-stream) runs to the end of the text.
function renderFence(lines, start) {
  const pad = lines[start].search(/\S/);
  const m = FENCE.exec(lines[start].slice(pad));
  const close = new RegExp(`^\\s*${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
  const dedent = new RegExp(`^ {0,${pad}}`);
  const body = [];
  let i = start + 1;
  for (; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i].replace(dedent, ""));
  const lang = m[2] ? ` data-lang="${m[2]}" class="language-${m[2]}"` : "";
  return [`<pre><code${lang}>${body.join("\n")}</code></pre>`, i + 1];
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

// One list, and by recursion the lists nested in it by indentation. Returns the next line index.
function renderList(lines, start, out) {
  const first = LIST_ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const tag = ordered ? "ol" : "ul";
  const number = parseInt(first[2], 10);
  const startAttr = ordered && number !== 1 ? ` start="${number}"` : "";
  const items = [];
  let i = start;
  while (i < lines.length) {
    if (lines[i].trim() === "") {
      // One blank line does not end the list when an item, or more of this item (indented under
      // it), follows.
      const next = lines[i + 1] ?? "";
      const nextItem = LIST_ITEM.exec(next);
      if (nextItem ? nextItem[1].length >= indent : next.trim() !== "" && next.search(/\S/) > indent) {
        i++;
        continue;
      }
      break;
    }
    const m = LIST_ITEM.exec(lines[i]);
    if (m && m[1].length > indent && items.length) {
      const nested = [];
      i = renderList(lines, i, nested);
      items[items.length - 1] += nested.join("");
    } else if (m && m[1].length >= indent && /\d/.test(m[2]) === ordered) {
      items.push(renderInline(m[3]));
      i++;
    } else if (!m && items.length && lines[i].search(/\S/) > indent && FENCE.test(lines[i].trimStart())) {
      // A code block inside the item (models indent them under numbered steps).
      let html;
      [html, i] = renderFence(lines, i);
      items[items.length - 1] += html;
    } else if (!m && items.length && lines[i].search(/\S/) > indent) {
      // An indented plain line under an item continues that item.
      const item = items[items.length - 1];
      items[items.length - 1] += `${item.endsWith("</pre>") ? "" : "<br>"}${renderInline(lines[i].trim())}`;
      i++;
    } else {
      break;
    }
  }
  out.push(`<${tag}${startAttr}>${items.map((item) => `<li>${item}</li>`).join("")}</${tag}>`);
  return i;
}
