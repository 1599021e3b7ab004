// The chat page of hhh serve: talk to the model, regenerate for a second answer, thumbs, pick the better of two.
// Every judgement goes to POST /v1/feedback and from there to the preference store. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];   // {role, content} messages the model sees: the user's, and the answers kept
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text || ""; }

async function errorOf(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) { status(await errorOf(r)); return; }
  const select = $("model");
  select.innerHTML = "";
  for (const m of (await r.json()).data) {
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    select.appendChild(o);
  }
  if (select.options.length > 1) select.selectedIndex = 1;   // an adapter (the aligned model) before the base
}

// Stream one answer into `box`; resolves to {id, text} once the server sends [DONE].
async function stream(messages, box) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    // no max_tokens: the server's default, shortened to what the context has room for
    body: JSON.stringify({ model: $("model").value, messages, stream: true }),
  });
  if (!r.ok) throw new Error(await errorOf(r));
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", id = null, text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return { id, text };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      id = chunk.id;
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (delta) { text += delta; box.textContent = text; }
    }
  }
  throw new Error("the answer was cut off");
}

async function feedback(body) {
  const r = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) { status(await errorOf(r)); return false; }
  status("");
  return true;
}

function tool(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

// One turn's answers side by side: the first, and after "regenerate" a second one to pick from.
function addAnswer(row, messages, kept) {
  const card = document.createElement("div");
  card.className = "turn answer";
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = "…";
  const tools = document.createElement("div");
  tools.className = "tools";
  card.append(text, tools);
  row.appendChild(card);
  const answer = { card, id: null, text: "" };
  return stream(messages, text).catch((e) => {
    text.textContent = "(no answer)";
    throw e;
  }).then(({ id, text: full }) => {
    answer.id = id;
    answer.text = full;
    card.dataset.responseId = id;
    const up = tool("👍", "a good answer", async () => {
      if (await feedback({ id, thumbs: 1 })) { up.disabled = down.disabled = true; card.classList.add("picked"); }
    });
    const down = tool("👎", "a bad answer", async () => {
      if (await feedback({ id, thumbs: -1 })) { up.disabled = down.disabled = true; card.classList.add("rejected"); }
    });
    up.className = "up";
    down.className = "down";
    tools.append(up, down);
    kept.push(answer);
    if (kept.length === 1) {
      const again = tool("↻ regenerate", "a second answer to compare", () => {
        again.remove();
        addAnswer(row, messages, kept).catch((e) => status(e.message));
      });
      again.className = "regenerate";
      tools.appendChild(again);
    } else {
      for (const [mine, other] of [[kept[0], kept[1]], [kept[1], kept[0]]]) {
        const pick = tool("this one is better", "prefer this answer to the other", async () => {
          // the two answers are two responses to one conversation: up for the pick, down for the other
          const ok = await feedback({ id: mine.id, thumbs: 1 }) && await feedback({ id: other.id, thumbs: -1 });
          if (!ok) return;
          mine.card.classList.add("picked");
          other.card.classList.add("rejected");
          row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
          conversation[messages.length] = { role: "assistant", content: mine.text };  // the turn's kept answer
        });
        pick.className = "pick";
        mine.card.querySelector(".tools").appendChild(pick);
      }
    }
    return answer;
  });
}

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (busy) return;
  const content = $("message").value.trim();
  if (!content) return;
  busy = true;
  $("send").disabled = true;
  status("");
  const user = document.createElement("div");
  user.className = "turn user";
  user.textContent = content;
  const row = document.createElement("div");
  row.className = "answers";
  $("log").append(user, row);
  $("message").value = "";
  conversation.push({ role: "user", content });
  const messages = conversation.slice();
  try {
    const first = await addAnswer(row, messages, []);
    conversation.push({ role: "assistant", content: first.text });
  } catch (e) {
    status(e.message);
    conversation.pop();
  } finally {
    busy = false;
    $("send").disabled = false;
  }
});

$("key").addEventListener("change", loadModels);
loadModels();
