// The two calls the page makes to the server (same origin), and reading the SSE stream of a chat completion
// (SERVING.md §4.2): `data: {chunk}` events separated by blank lines, at most one error event `data: {"error": ...}`
// when generation fails after the first byte, and `data: [DONE]` at the end.

export class APIError extends Error {
  constructor(message, status = null, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(apiKey, extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

// The server's error envelope {"error": {"message", "type", "param", "code"}} as an APIError.
async function errorOf(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not an envelope (a proxy's page, say): the status line is all there is
  }
  const message = error && typeof error.message === "string" ? error.message : `HTTP ${response.status} ${response.statusText}`;
  return new APIError(message, response.status, error ? error.code : null);
}

// The served model id (the `model` every request must name).
export async function servedModel(apiKey) {
  const response = await fetch("v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return body.data[0].id;
}

// POST v1/chat/completions with stream: true; onDelta(text) for each piece of choice 0 as it arrives.
// Resolves to the finish reason at [DONE]; rejects with APIError (HTTP or in-stream error), or with the fetch's
// AbortError when `signal` aborts.
export async function streamChat(body, { apiKey, signal, onDelta }) {
  const response = await fetch("v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey, { "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue; // comments and keep-alives
      if (data === "[DONE]") {
        await reader.cancel();
        return finish;
      }
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new APIError("The server sent an event that is not JSON; the answer may be incomplete.");
      }
      if (chunk.error) throw new APIError(chunk.error.message || "The server failed while answering.", null, chunk.error.code);
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        const text = choice.delta && choice.delta.content;
        if (text) onDelta(text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  throw new APIError("The connection closed before the answer was complete.");
}
