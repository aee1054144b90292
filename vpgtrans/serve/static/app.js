// The chat page: one image per conversation, answers streamed from /v1/chat/completions (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, image: null, history: [], busy: false };

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("status").textContent = busy ? "answering…" : "";
}

function reset(note) {
  state.history = [];
  $("messages").replaceChildren();
  if (note) addMessage("note", note);
}

async function loadInfo() {
  try {
    const info = await (await fetch("/info")).json();
    state.model = info.id;
    const c = info.components || {};
    const part = (p) => (p ? p.name + (p.path ? " (" + p.path + ")" : "") : "?");
    const origin = info.origin && info.origin.kind
      ? " · " + info.origin.kind + (info.origin.source ? " from " + info.origin.source : "")
        + (info.origin.recipe ? " (recipe " + info.origin.recipe + ")" : "")
      : "";
    const el = $("model-info");
    el.replaceChildren();
    const id = document.createElement("code");
    id.textContent = info.id;
    el.append("model ", id, ": " + part(c.vision) + " → " + part(c.vpg) + " → " + part(c.llm) + origin);
  } catch (err) {
    $("model-info").textContent = "could not load model information: " + err;
  }
}

function useImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    addMessage("error", file.name + " is not an image");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const hadConversation = state.history.length > 0;
    state.image = reader.result; // a data: URL, sent as an image_url part
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    reset(hadConversation ? "new image: new conversation" : null);
  };
  reader.readAsDataURL(file);
}

function requestMessages(question) {
  const messages = [];
  state.history.forEach(([q, a], i) => {
    messages.push({ role: "user", content: i === 0 ? withImage(q) : q });
    messages.push({ role: "assistant", content: a });
  });
  messages.push({ role: "user", content: state.history.length === 0 ? withImage(question) : question });
  return messages;
}

function withImage(text) {
  return [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }];
}

async function ask(question) {
  const body = {
    model: state.model,
    messages: requestMessages(question),
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  // An empty first question is how BLIP-2-style captioners are asked for a caption.
  const asked = addMessage("user", question || "(no question: caption)");
  if (!question) asked.classList.add("empty");
  const bubble = addMessage("assistant streaming", "");
  setBusy(true);
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.status + " " + response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            bubble.textContent = answer;
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
    state.history.push([question, answer]);
    if (!answer) {
      bubble.classList.add("empty");
      bubble.textContent = "(empty answer)";
    }
  } catch (err) {
    bubble.className = "msg error";
    bubble.textContent = "error: " + err.message;
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    setBusy(false);
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("prompt").value.trim();
  if ((!question && state.history.length > 0) || state.busy) return;
  if (!state.image) {
    addMessage("error", "choose or drop an image first");
    return;
  }
  $("prompt").value = "";
  ask(question);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("image-input").addEventListener("change", (event) => useImage(event.target.files[0]));
$("reset").addEventListener("click", () => reset(null));
const drop = $("drop");
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") $("image-input").click();
});
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.remove("over");
}));
drop.addEventListener("drop", (event) => useImage(event.dataTransfer.files[0]));
loadInfo();
