// The chat page: images in (button, paste, drop) -> OpenAI `messages` with `image_url` data: URLs -> streamed answer,
// grounding boxes drawn over the image the question was about.
//
// The conversation lives only here (`history`, resent whole each turn, as the API is stateless). Model text is only
// ever put into the DOM with textContent, never parsed as HTML.

import { APIError, servedModel, streamChat } from "./api.js";
import { boxPercent, parseAnswer } from "./grounding.js";

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"]; // what the server decodes
const MAX_IMAGE_BYTES = 10 * 1024 * 1024; // base64 adds a third; the server takes 20 MiB bodies by default
const BOX_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#9a6324", "#800000"];
const KEY_STORAGE = "internvl.apiKey"; // sessionStorage: forgotten when the tab closes

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), apiKey: $("api-key"), tiles: $("tiles"), temperature: $("temperature"), newChat: $("new-chat"),
  conversation: $("conversation"), hint: $("empty-hint"), composer: $("composer"), attachments: $("attachments"),
  file: $("file"), prompt: $("prompt"), send: $("send"), stop: $("stop"), status: $("status"),
};

const state = {
  model: null, // the served model id, from GET v1/models
  history: [], // OpenAI messages so far: {role: "user" | "assistant", content}
  attachments: [], // images for the next message: {url: data URL, name}
  lastImage: null, // data URL of the latest image sent: answers' boxes are drawn over it
  controller: null, // AbortController of the answer being streamed
};

// ------------------------------------------------------------------------------------------------ small helpers
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// ------------------------------------------------------------------------------------------------ the model id
async function connect() {
  try {
    state.model = await servedModel(apiKey());
    ui.model.textContent = state.model;
    ui.model.classList.remove("error");
  } catch (err) {
    state.model = null;
    ui.model.textContent = err.status === 401 ? "this server needs an API key" : `not connected: ${err.message}`;
    ui.model.classList.add("error");
    throw err;
  }
}

// ------------------------------------------------------------------------------------------------ attachments
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) {
      setStatus(`${file.name || "The pasted file"} is not an image the server reads (PNG, JPEG, WEBP, GIF or BMP).`, true);
      continue;
    }
    if (file.size > MAX_IMAGE_BYTES) {
      setStatus(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; images up to 10 MiB are accepted.`, true);
      continue;
    }
    state.attachments.push({ url: await readAsDataURL(file), name: file.name || "pasted image" });
    setStatus("");
  }
  renderAttachments();
}

function thumbnail(url, name) {
  const img = el("img", "thumb");
  img.src = url;
  img.alt = name;
  img.title = name;
  return img;
}

function renderAttachments() {
  ui.attachments.replaceChildren(
    ...state.attachments.map((image, i) => {
      const item = el("span", "attachment");
      const remove = el("button", "remove", "×");
      remove.type = "button";
      remove.title = `Remove ${image.name}`;
      remove.addEventListener("click", () => {
        state.attachments.splice(i, 1);
        renderAttachments();
      });
      item.append(thumbnail(image.url, image.name), remove);
      return item;
    }),
  );
}

// ------------------------------------------------------------------------------------------------ rendering turns
function addTurn(role) {
  ui.hint.hidden = true;
  const turn = el("div", `turn ${role}`);
  ui.conversation.append(turn);
  return turn;
}

function renderUserTurn(text, images) {
  const turn = addTurn("user");
  if (images.length) {
    const row = el("div", "images");
    row.append(...images.map((image) => thumbnail(image.url, image.name)));
    turn.append(row);
  }
  if (text) turn.append(el("div", "text", text));
}

// The answer so far: text with the grounding tags turned into labels, and the boxes over `image`.
function renderAnswer(turn, raw, image, streaming) {
  const { segments, boxes } = parseAnswer(raw, streaming);
  const color = (i) => BOX_COLORS[i % BOX_COLORS.length];
  const text = el("div", "text");
  for (const segment of segments) {
    if (segment.kind === "text") {
      text.append(segment.text);
    } else if (segment.kind === "ref") {
      const ref = el("span", "ref", segment.text);
      if (segment.box !== null) ref.style.setProperty("--box-color", color(segment.box));
      text.append(ref);
    } else {
      for (const i of segment.boxes) {
        const chip = el("span", "box-chip", String(i + 1));
        chip.title = `box ${i + 1}: [${boxes[i].coords.join(", ")}] of 1000`;
        chip.style.setProperty("--box-color", color(i));
        text.append(chip);
      }
    }
  }
  const parts = [text];
  if (boxes.length && image) {
    const figure = el("div", "grounded");
    const img = el("img");
    img.src = image;
    img.alt = "the image the question was about, with the answer's boxes";
    figure.append(img);
    boxes.forEach((box, i) => {
      const { left, top, width, height } = boxPercent(box.coords);
      const frame = el("div", "box");
      Object.assign(frame.style, { left: `${left}%`, top: `${top}%`, width: `${width}%`, height: `${height}%` });
      frame.style.setProperty("--box-color", color(i));
      frame.append(el("span", "box-label", box.label || `box ${i + 1}`));
      figure.append(frame);
    });
    parts.push(figure);
  } else if (boxes.length) {
    parts.push(el("p", "muted", "(The answer has boxes, but no image was sent to draw them on.)"));
  }
  turn.replaceChildren(...parts);
}

// ------------------------------------------------------------------------------------------------ one exchange
function requestSettings() {
  const tiles = ui.tiles.value.trim();
  const temperature = ui.temperature.value.trim();
  if (tiles && !(/^\d+$/.test(tiles) && Number(tiles) >= 1)) throw new APIError(`Tiles per image must be a whole number >= 1, got "${tiles}".`);
  if (temperature && !(Number(temperature) >= 0)) throw new APIError(`Temperature must be a number >= 0, got "${temperature}".`);
  return { tiles: tiles ? Number(tiles) : null, temperature: temperature ? Number(temperature) : null };
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

async function send() {
  const text = ui.prompt.value.trim();
  const images = state.attachments;
  if (state.controller || (!text && !images.length)) return;
  let settings;
  try {
    settings = requestSettings();
    if (!state.model) await connect();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  const content = images.length
    ? [
        ...images.map((image) => ({
          type: "image_url",
          image_url: settings.tiles ? { url: image.url, max_dynamic_patch: settings.tiles } : { url: image.url },
        })),
        { type: "text", text },
      ]
    : text;
  const imageOfQuestion = images.length ? images[images.length - 1].url : state.lastImage;
  const history = state.history; // this conversation's, even if "New chat" replaces it while the answer streams
  history.push({ role: "user", content });
  renderUserTurn(text, images);
  ui.prompt.value = "";
  state.attachments = [];
  renderAttachments();
  setStatus("");

  const turn = addTurn("assistant pending");
  const body = { model: state.model, messages: history };
  if (settings.temperature !== null) body.temperature = settings.temperature;
  const controller = (state.controller = new AbortController());
  setBusy(true);
  let raw = "";
  let note = null;
  let complete = false;
  try {
    const finish = await streamChat(body, {
      apiKey: apiKey(),
      signal: controller.signal,
      onDelta: (delta) => {
        raw += delta;
        turn.classList.remove("pending");
        renderAnswer(turn, raw, imageOfQuestion, true);
        scrollToEnd();
      },
    });
    complete = true;
    if (finish === "length") note = "(cut at the token limit)";
  } catch (err) {
    note = err.name === "AbortError" ? "(stopped)" : `Error: ${err.message}`;
  } finally {
    state.controller = null;
    setBusy(false);
  }
  turn.classList.remove("pending");
  renderAnswer(turn, raw, imageOfQuestion, !complete); // a broken-off answer keeps its unfinished tag hidden
  if (note) turn.append(el("p", note.startsWith("Error") ? "error" : "muted", note));
  turn.classList.add("done");
  if (history !== state.history) return; // a new chat began meanwhile
  if (raw) {
    history.push({ role: "assistant", content: raw }); // raw, tags included: the model sees what it said
    if (images.length) state.lastImage = imageOfQuestion;
  } else {
    // nothing came back: forget the question, and give it back to the composer to retry
    history.pop();
    ui.prompt.value = text;
    state.attachments = images;
    renderAttachments();
  }
  scrollToEnd();
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.lastImage = null;
  ui.conversation.replaceChildren(ui.hint);
  ui.hint.hidden = false;
  setStatus("");
}

// ------------------------------------------------------------------------------------------------ wiring
ui.apiKey.value = apiKey();
ui.apiKey.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
  connect().catch(() => {});
});
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.newChat.addEventListener("click", newChat);
ui.file.addEventListener("change", () => {
  addFiles([...ui.file.files]);
  ui.file.value = ""; // choosing the same file again fires change again
});
document.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData ? event.clipboardData.items : [])]
    .filter((item) => item.kind === "file")
    .map((item) => item.getAsFile())
    .filter(Boolean);
  if (files.length) {
    event.preventDefault();
    addFiles(files);
  }
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  addFiles([...event.dataTransfer.files]);
});
connect().catch(() => {});
