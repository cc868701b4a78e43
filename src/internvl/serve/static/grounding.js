// Grounding tags in answers (INTERNVL.md §18): `<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>`, coordinates in
// 0..1000 relative to the image's width and height. Parsed as leniently as internvl/grounding.py `parse_boxes`: a
// `<ref>` counts as a box's label only when its `<box>` follows (whitespace allowed between), inner lists that are not
// four numbers are skipped.
//
//   parseAnswer(text, streaming) -> {segments, boxes}
//     segments: [{kind: "text", text} | {kind: "ref", text, box} | {kind: "box", boxes: [index, ...]}], in order
//     boxes:    [{label, coords: [x1, y1, x2, y2]}]   (label: the phrase, or null for a bare <box>)
//
// While streaming, an unfinished tag at the end is held back instead of flashing as raw text.

const NUMBER = String.raw`[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?`;
const INNER_BOX = new RegExp(String.raw`\[\s*(${NUMBER})\s*,\s*(${NUMBER})\s*,\s*(${NUMBER})\s*,\s*(${NUMBER})\s*\]`, "g");
const TAGGED = /<ref>((?:(?!<\/?ref>)[\s\S])*?)<\/ref>|<box>((?:(?!<\/?box>)[\s\S])*?)<\/box>/g;
const TAG_NAMES = ["<ref>", "</ref>", "<box>", "</box>"];

export function parseAnswer(text, streaming = false) {
  const segments = [];
  const boxes = [];
  let pendingRef = null; // the last <ref> segment, while only whitespace separates it from what comes next
  let at = 0;
  for (const match of text.matchAll(TAGGED)) {
    const between = text.slice(at, match.index);
    if (between) segments.push({ kind: "text", text: between });
    if (between.trim()) pendingRef = null;
    if (match[1] !== undefined) {
      pendingRef = { kind: "ref", text: match[1].trim(), box: null };
      segments.push(pendingRef);
    } else {
      const indices = [];
      for (const inner of match[2].matchAll(INNER_BOX)) {
        indices.push(boxes.length);
        boxes.push({ label: pendingRef ? pendingRef.text : null, coords: inner.slice(1, 5).map(Number) });
      }
      if (pendingRef && indices.length) pendingRef.box = indices[0];
      segments.push({ kind: "box", boxes: indices });
      pendingRef = null;
    }
    at = match.index + match[0].length;
  }
  const rest = streaming ? withoutUnfinishedTag(text.slice(at)) : text.slice(at);
  if (rest) segments.push({ kind: "text", text: rest });
  return { segments, boxes };
}

// Text after the last complete tag, cut where a tag starts that is not finished yet: an open <box> (its numbers are
// useless until it closes), an open <ref> (shown without the tag), or a prefix of a tag name at the very end.
function withoutUnfinishedTag(rest) {
  const box = rest.indexOf("<box>");
  if (box >= 0) rest = rest.slice(0, box);
  const ref = rest.indexOf("<ref>");
  if (ref >= 0) rest = rest.slice(0, ref) + rest.slice(ref + 5);
  const lt = rest.lastIndexOf("<");
  if (lt >= 0 && TAG_NAMES.some((tag) => tag.startsWith(rest.slice(lt)))) rest = rest.slice(0, lt);
  return rest;
}

// A box in 0..1000 as CSS percentages of the image, clamped to the image and with corners in order.
export function boxPercent([x1, y1, x2, y2]) {
  const clamp = (v) => Math.min(1000, Math.max(0, v)) / 10;
  const [left, right] = [clamp(Math.min(x1, x2)), clamp(Math.max(x1, x2))];
  const [top, bottom] = [clamp(Math.min(y1, y2)), clamp(Math.max(y1, y2))];
  return { left, top, width: right - left, height: bottom - top };
}
