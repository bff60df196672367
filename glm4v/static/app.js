// The chat page: one conversation about one image, sent to /v1/chat/completions (streamed).
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed", "api-key"];
  const MAX_IMAGE_BYTES = 20 * 1024 * 1024;

  const state = {
    model: null,
    history: [], // {role, content} of finished turns
    image: null, // data URL of the conversation's image, sent with the first user message every turn
    imageName: "",
    controller: null, // AbortController of the answer being streamed
  };

  // ---- settings (kept in localStorage) ----------------------------------------------------------
  for (const id of SETTINGS) {
    const el = $(id);
    const saved = localStorage.getItem("glm4v." + id);
    if (saved !== null) el.value = saved;
    el.addEventListener("change", () => localStorage.setItem("glm4v." + id, el.value));
  }
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text || "";
    el.classList.toggle("error", !!isError);
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (response.status === 401) {
        setStatus("This server needs an API key: enter it under Settings.", true);
        $("settings").hidden = false;
        return;
      }
      const body = await response.json();
      state.model = body.data[0].id;
      $("model-name").textContent = state.model;
    } catch (e) {
      setStatus("Cannot reach the server: " + e.message, true);
    }
  }
  $("api-key").addEventListener("change", loadModel);

  // ---- image ------------------------------------------------------------------------------------
  function useImage(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) { setStatus(`${file.name} is not an image`, true); return; }
    if (file.size > MAX_IMAGE_BYTES) { setStatus(`${file.name} is larger than 20 MB`, true); return; }
    const reader = new FileReader();
    reader.onload = () => {
      newChat(); // the model takes one image per conversation: a new image starts over
      state.image = reader.result;
      state.imageName = file.name;
      $("image-preview").src = state.image;
      $("image-name").textContent = file.name;
      $("image-bar").hidden = false;
      setStatus("");
      $("prompt").focus();
    };
    reader.onerror = () => setStatus("Could not read " + file.name, true);
    reader.readAsDataURL(file);
  }
  $("image-input").addEventListener("change", (e) => { useImage(e.target.files[0]); e.target.value = ""; });
  $("remove-image").addEventListener("click", () => { newChat(); clearImage(); });

  function clearImage() {
    state.image = null;
    state.imageName = "";
    $("image-bar").hidden = true;
    $("image-preview").removeAttribute("src");
  }

  const chat = $("chat");
  ["dragenter", "dragover"].forEach((t) => chat.addEventListener(t, (e) => { e.preventDefault(); chat.classList.add("dragging"); }));
  ["dragleave", "drop"].forEach((t) => chat.addEventListener(t, (e) => { e.preventDefault(); chat.classList.remove("dragging"); }));
  chat.addEventListener("drop", (e) => useImage(e.dataTransfer.files[0]));
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) useImage(item.getAsFile());
  });

  // ---- messages ---------------------------------------------------------------------------------
  function addMessage(role, text, image) {
    const el = document.createElement("div");
    el.className = "message " + role;
    if (image) {
      const img = document.createElement("img");
      img.src = image;
      img.alt = "attached image";
      el.appendChild(img);
    }
    const body = document.createElement("div");
    body.className = "body";
    if (role === "assistant") body.innerHTML = window.renderMarkdown(text);
    else body.textContent = text;
    el.appendChild(body);
    $("messages").appendChild(el);
    el.scrollIntoView({ block: "end" });
    return body;
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren();
    setStatus("");
  }
  $("new-chat").addEventListener("click", () => { newChat(); clearImage(); $("prompt").focus(); });

  function requestMessages(question) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const turns = state.history.concat([{ role: "user", content: question }]);
    let imageSent = false;
    for (const turn of turns) {
      if (turn.role === "user" && state.image && !imageSent) {
        imageSent = true;
        messages.push({ role: "user", content: [
          { type: "image_url", image_url: { url: state.image } },
          { type: "text", text: turn.content },
        ] });
      } else {
        messages.push({ role: turn.role, content: turn.content });
      }
    }
    return messages;
  }

  function generationSettings() {
    const out = {};
    const number = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
    const t = number("temperature"), p = number("top-p"), m = number("max-tokens"), s = number("seed");
    if (t !== null) out.temperature = t;
    if (p !== null) out.top_p = p;
    if (m !== null) out.max_tokens = Math.round(m);
    if (s !== null) out.seed = Math.round(s);
    return out;
  }

  async function send(question) {
    const userImage = state.history.length === 0 ? state.image : null;
    addMessage("user", question, userImage);
    const answerEl = addMessage("assistant", "");
    answerEl.parentElement.classList.add("streaming");
    let answer = "";
    let rendered = false;
    const render = () => {
      if (rendered) return;
      rendered = true;
      requestAnimationFrame(() => { rendered = false; answerEl.innerHTML = window.renderMarkdown(answer); answerEl.parentElement.scrollIntoView({ block: "end" }); });
    };

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    setStatus("");
    const body = Object.assign({ model: state.model || undefined, messages: requestMessages(question), stream: true,
      stream_options: { include_usage: true } }, generationSettings());
    let finish = null, usage = null;
    try {
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
      if (!response.ok) {
        let message = `HTTP ${response.status}`;
        try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error(message);
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
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              if (choice.delta && choice.delta.content) { answer += choice.delta.content; render(); }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") setStatus(e.message, true);
    } finally {
      answerEl.innerHTML = window.renderMarkdown(answer);
      answerEl.parentElement.classList.remove("streaming");
      answerEl.parentElement.dataset.finish = finish || (controller.signal.aborted ? "stopped" : "error");
      if (state.controller === controller) {
        state.controller = null;
        // a stopped answer stays in the history: the next question continues from what was shown
        if (answer || finish) state.history.push({ role: "user", content: question }, { role: "assistant", content: answer });
        setBusy(false);
        if (controller.signal.aborted) setStatus("Stopped.");
        else if (usage && !$("status").classList.contains("error")) {
          const reused = (usage.prompt_tokens_details || {}).cached_tokens || 0;
          setStatus(`${usage.prompt_tokens} prompt tokens (${reused} reused), ${usage.completion_tokens} generated` +
            (finish === "length" ? " (stopped at the token limit)" : ""));
        }
      }
    }
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $("prompt").value.trim();
    if (!question || state.controller) return;
    $("prompt").value = "";
    send(question);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });

  loadModel();
})();
