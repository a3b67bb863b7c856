// The chat page: one conversation with the served model through /v1/chat/completions,
// streamed, with a stop button. No build step and nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, ready: false, messages: [], controller: null };

$("key").value = localStorage.getItem("tandem-api-key") || "";
$("key").addEventListener("change", () => localStorage.setItem("tandem-api-key", $("key").value));
$("max-tokens").value = localStorage.getItem("tandem-max-tokens") || "";
$("max-tokens").addEventListener("change", () => localStorage.setItem("tandem-max-tokens", $("max-tokens").value));

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function pollHealth() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    state.model = body.model;
    $("model").textContent = body.model || "";
    if (response.ok) {
      state.ready = true;
      setStatus("ready");
      return;
    }
    if (body.status === "failed") {
      setStatus("the model failed to load: " + (body.error || "unknown error"), true);
      return;
    }
    setStatus("loading the model…");
  } catch (error) {
    setStatus("cannot reach the server", true);
  }
  setTimeout(pollHealth, 1000);
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") div.innerHTML = renderMarkdown(text);
  else div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h.Authorization = "Bearer " + $("key").value;
  return h;
}

function errorText(body, status) {
  if (body && body.error) return typeof body.error === "string" ? body.error : body.error.message;
  return "the server answered " + status;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const stats = document.createElement("div");
  stats.className = "stats";
  let reply = "";
  let first = null;
  let usage = null;
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const request = {
      model: state.model, messages: state.messages, stream: true, stream_options: { include_usage: true },
    };
    const limit = parseInt($("max-tokens").value, 10);
    if (limit > 0) request.max_completion_tokens = limit;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal, body: JSON.stringify(request),
    });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (e) { /* not JSON */ }
      throw new Error(errorText(body, response.status));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(errorText(chunk, 500));
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          reply += delta.content;
          div.innerHTML = renderMarkdown(reply);
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
    }
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    if (usage && seconds > 0 && usage.completion_tokens > 1) {
      stats.textContent = usage.completion_tokens + " tokens, " +
        ((usage.completion_tokens - 1) / seconds).toFixed(1) + " tokens/s";
    }
  } catch (error) {
    if (error.name === "AbortError") stats.textContent = "stopped";
    else {
      div.classList.add("error");
      div.textContent = "Error: " + error.message;
    }
  } finally {
    state.messages.push({ role: "assistant", content: reply });
    div.appendChild(stats);
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  if (!state.ready) {
    setStatus("the model is still loading; try again in a moment", true);
    return;
  }
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").innerHTML = "";
});

pollHealth();
