// Small behaviours the console's pages opt into with data- attributes. Every page works
// without this file; it only saves clicks.
(function () {
  "use strict";

  // <select data-autosubmit>: submit its form on change (the organization switcher).
  document.addEventListener("change", function (event) {
    var select = event.target.closest("[data-autosubmit]");
    if (select && select.form) select.form.requestSubmit();
  });

  // <form data-confirm="Really?">: ask before a destructive submit.
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  }, true);

  // <button data-copy="element-id">: copy that element's text.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent.trim()).then(function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });
})();

// The playground: POST /v1/chat/completions with stream=true and append each token as it
// arrives (fetch + ReadableStream; the gateway speaks server-sent events like OpenAI's API).
(function () {
  "use strict";
  var form = document.querySelector("[data-playground]");
  if (!form) return;
  var log = document.getElementById("chat-log");
  var prompt = document.getElementById("prompt");
  var send = document.getElementById("send");
  var stop = document.getElementById("stop");
  var usage = document.getElementById("chat-usage");
  var history = [];
  var controller = null;

  function bubble(role, text) {
    var empty = document.getElementById("chat-empty");
    if (empty) empty.remove();
    var item = document.createElement("div");
    item.className = "msg " + role;
    var label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "You" : role === "assistant" ? form.dataset.model : "Error";
    var body = document.createElement("span");
    body.className = "content";
    body.textContent = text || "";
    item.appendChild(label);
    item.appendChild(body);
    log.appendChild(item);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  function errorText(status, text) {
    try {
      var parsed = JSON.parse(text);
      if (parsed.error && parsed.error.message) return parsed.error.message + " (HTTP " + status + ")";
    } catch (ignored) { /* not JSON */ }
    return "HTTP " + status + ": " + (text || "no answer");
  }

  async function ask(message) {
    history.push({ role: "user", content: message });
    bubble("user", message);
    var answer = bubble("assistant", "");
    answer.parentNode.setAttribute("aria-busy", "true");
    var messages = history.slice();
    var system = document.getElementById("system").value.trim();
    if (system) messages.unshift({ role: "system", content: system });
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    usage.textContent = "";
    var text = "";
    try {
      var response = await fetch(form.dataset.endpoint, {
        method: "POST",
        headers: {
          "Authorization": "Bearer " + form.dataset.key,
          "Content-Type": "application/json",
          "Accept": "text/event-stream"
        },
        body: JSON.stringify({
          model: form.dataset.model,
          messages: messages,
          stream: true,
          stream_options: { include_usage: true },
          max_tokens: parseInt(document.getElementById("max_tokens").value, 10) || 256,
          temperature: parseFloat(document.getElementById("temperature").value) || 0
        }),
        signal: controller.signal
      });
      if (!response.ok) {
        answer.parentNode.remove();
        bubble("error", errorText(response.status, await response.text()));
        history.pop();
        return;
      }
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        var events = buffer.split(/\r?\n\r?\n/);
        buffer = events.pop();
        events.forEach(function (event) {
          event.split(/\r?\n/).forEach(function (line) {
            if (line.indexOf("data:") !== 0) return;
            var data = line.slice(5).trim();
            if (!data || data === "[DONE]") return;
            var parsed = JSON.parse(data);
            if (parsed.error) throw new Error(parsed.error.message || "the stream failed");
            if (parsed.choices && parsed.choices.length && parsed.choices[0].delta) {
              var piece = parsed.choices[0].delta.content || "";
              text += piece;
              answer.textContent = text;
              log.scrollTop = log.scrollHeight;
            }
            if (parsed.usage) {
              usage.textContent = parsed.usage.prompt_tokens + " prompt + " +
                parsed.usage.completion_tokens + " completion tokens";
            }
          });
        });
      }
      history.push({ role: "assistant", content: text });
    } catch (error) {
      if (error.name === "AbortError") {
        history.push({ role: "assistant", content: text });
        usage.textContent = "Stopped.";
      } else {
        bubble("error", error.message || String(error));
      }
    } finally {
      answer.parentNode.removeAttribute("aria-busy");
      send.disabled = false;
      stop.disabled = true;
      controller = null;
      prompt.focus();
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var message = prompt.value.trim();
    if (!message || controller) return;
    prompt.value = "";
    ask(message);
  });
  prompt.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  stop.addEventListener("click", function () { if (controller) controller.abort(); });
  document.getElementById("clear").addEventListener("click", function () {
    history = [];
    log.innerHTML = "";
    usage.textContent = "";
    prompt.focus();
  });
})();
