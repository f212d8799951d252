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
  var toolsBox = document.getElementById("tools");
  var toolChoice = document.getElementById("tool_choice");
  var formatBox = document.getElementById("response_format");
  var schemaField = document.getElementById("schema-field");
  var schemaBox = document.getElementById("json_schema");
  var history = [];
  var controller = null;
  var EXAMPLE_TOOLS = [{
    type: "function",
    function: {
      name: "get_weather",
      description: "The weather in a city now.",
      parameters: {
        type: "object",
        properties: {
          city: { type: "string", description: "City name" },
          unit: { "enum": ["celsius", "fahrenheit"] }
        },
        required: ["city", "unit"],
        additionalProperties: false
      }
    }
  }];
  var EXAMPLE_SCHEMA = {
    type: "object",
    properties: {
      title: { type: "string" },
      rating: { type: "integer", minimum: 1, maximum: 5 },
      tags: { type: "array", items: { "enum": ["fun", "serious", "short"] } }
    },
    required: ["title", "rating", "tags"],
    additionalProperties: false
  };

  document.getElementById("tools-example").addEventListener("click", function () {
    toolsBox.value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
  });
  document.getElementById("schema-example").addEventListener("click", function () {
    schemaBox.value = JSON.stringify(EXAMPLE_SCHEMA, null, 2);
  });
  formatBox.addEventListener("change", function () {
    schemaField.hidden = formatBox.value !== "json_schema";
  });

  // The request's tools and response_format from the settings; throws on JSON that does not parse.
  function structuredFields() {
    var fields = {};
    var tools = toolsBox.value.trim();
    if (tools) {
      try { fields.tools = JSON.parse(tools); } catch (error) { throw new Error("Tools: " + error.message); }
      fields.tool_choice = toolChoice.value;
    }
    if (formatBox.value === "json_object") fields.response_format = { type: "json_object" };
    if (formatBox.value === "json_schema") {
      var schema;
      try { schema = JSON.parse(schemaBox.value); } catch (error) { throw new Error("JSON schema: " + error.message); }
      fields.response_format = {
        type: "json_schema",
        json_schema: { name: "playground", strict: true, schema: schema }
      };
    }
    return fields;
  }

  // An answer's tool calls: name, arguments (pretty when they parse), and a box to send each
  // call's result back; once every call has one, the model answers with them.
  function showToolCalls(answer, calls) {
    var block = document.createElement("div");
    block.className = "tool-calls";
    var pending = calls.length;
    calls.forEach(function (call) {
      var item = document.createElement("div");
      item.className = "tool-call";
      var head = document.createElement("div");
      head.innerHTML = "<span class=\"badge info\">tool call</span> ";
      var name = document.createElement("code");
      name.textContent = call.function.name + " · " + call.id;
      head.appendChild(name);
      var args = document.createElement("pre");
      try {
        args.textContent = JSON.stringify(JSON.parse(call.function.arguments), null, 2);
      } catch (ignored) {
        args.textContent = call.function.arguments + "\n(arguments cut short: not valid JSON)";
      }
      var row = document.createElement("div");
      row.className = "row";
      var result = document.createElement("input");
      result.type = "text";
      result.placeholder = "The tool's result, e.g. {\"temperature\": 21}";
      result.setAttribute("aria-label", "Result of " + call.function.name);
      var reply = document.createElement("button");
      reply.type = "button";
      reply.className = "secondary small";
      reply.textContent = "Send result";
      reply.addEventListener("click", function () {
        history.push({ role: "tool", tool_call_id: call.id, content: result.value || "{}" });
        reply.disabled = result.disabled = true;
        pending -= 1;
        if (pending === 0 && !controller) ask(null);
      });
      row.appendChild(result);
      row.appendChild(reply);
      item.appendChild(head);
      item.appendChild(args);
      item.appendChild(row);
      block.appendChild(item);
    });
    answer.parentNode.appendChild(block);
  }

  // A JSON answer (response_format), parsed and shown indented, or why it does not parse.
  function showParsedJson(answer, text) {
    var block = document.createElement("div");
    block.className = "parsed-json";
    var label = document.createElement("span");
    var pre = document.createElement("pre");
    try {
      pre.textContent = JSON.stringify(JSON.parse(text), null, 2);
      label.innerHTML = "<span class=\"badge ok\">parsed JSON</span>";
    } catch (error) {
      pre.textContent = error.message;
      label.innerHTML = "<span class=\"badge warn\">not valid JSON</span>";
    }
    block.appendChild(label);
    block.appendChild(pre);
    answer.parentNode.appendChild(block);
  }

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

  // Send the conversation; `message` (null: answering tool results) joins it first.
  async function ask(message) {
    var fields;
    try {
      fields = structuredFields();
    } catch (error) {
      bubble("error", error.message);
      return;
    }
    if (message !== null) {
      history.push({ role: "user", content: message });
      bubble("user", message);
    }
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
    var calls = [];
    var finished = null;
    try {
      var response = await fetch(form.dataset.endpoint, {
        method: "POST",
        headers: {
          "Authorization": "Bearer " + form.dataset.key,
          "Content-Type": "application/json",
          "Accept": "text/event-stream"
        },
        body: JSON.stringify(Object.assign({
          model: form.dataset.model,
          messages: messages,
          stream: true,
          stream_options: { include_usage: true },
          max_tokens: parseInt(document.getElementById("max_tokens").value, 10) || 256,
          temperature: parseFloat(document.getElementById("temperature").value) || 0
        }, fields)),
        signal: controller.signal
      });
      if (!response.ok) {
        answer.parentNode.remove();
        bubble("error", errorText(response.status, await response.text()));
        if (message !== null) history.pop();
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
              var delta = parsed.choices[0].delta;
              text += delta.content || "";
              // Tool calls stream as OpenAI's do: id, type and name first, then arguments.
              (delta.tool_calls || []).forEach(function (part) {
                var call = calls[part.index] || (calls[part.index] = {
                  id: "", type: "function", "function": { name: "", arguments: "" }
                });
                if (part.id) call.id = part.id;
                if (part["function"] && part["function"].name) call["function"].name = part["function"].name;
                if (part["function"] && part["function"].arguments) call["function"].arguments += part["function"].arguments;
              });
              answer.textContent = text || (calls.length ? calls.map(function (c) {
                return c["function"].name + "(" + c["function"].arguments + ")";
              }).join("\n") : "");
              if (parsed.choices[0].finish_reason) finished = parsed.choices[0].finish_reason;
              log.scrollTop = log.scrollHeight;
            }
            if (parsed.usage) {
              usage.textContent = parsed.usage.prompt_tokens + " prompt + " +
                parsed.usage.completion_tokens + " completion tokens";
            }
          });
        });
      }
      if (calls.length) {
        history.push({ role: "assistant", content: null, tool_calls: calls });
        answer.textContent = finished === "length" ? "(cut at max tokens)" : "";
        showToolCalls(answer, calls);
      } else {
        history.push({ role: "assistant", content: text });
        if (fields.response_format) showParsedJson(answer, text);
      }
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
