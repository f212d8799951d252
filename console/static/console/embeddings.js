// The playground's embeddings tab: POST /v1/embeddings through the gateway with the page's
// short-lived key, then each vector's size, norm and first values, and the cosine similarity
// of every pair of inputs. base64 answers are decoded as OpenAI's SDKs do (little-endian
// float32 bytes).
(function () {
  "use strict";
  var form = document.querySelector("[data-embeddings]");
  if (!form) return;
  var button = document.getElementById("embed");
  var usage = document.getElementById("embed-usage");
  var failure = document.getElementById("embed-error");
  var results = document.getElementById("embed-results");

  function vectorOf(embedding) {
    if (typeof embedding !== "string") return embedding;
    var bytes = Uint8Array.from(atob(embedding), function (c) { return c.charCodeAt(0); });
    var view = new DataView(bytes.buffer);
    var values = [];
    for (var i = 0; i < bytes.length; i += 4) values.push(view.getFloat32(i, true));
    return values;
  }

  function dot(a, b) {
    var sum = 0;
    for (var i = 0; i < a.length; i++) sum += a[i] * b[i];
    return sum;
  }

  function cell(row, text, tag, className) {
    var element = document.createElement(tag || "td");
    element.textContent = text;
    if (className) element.className = className;
    row.appendChild(element);
    return element;
  }

  function show(inputs, vectors) {
    var body = document.querySelector("#embed-vectors tbody");
    body.textContent = "";
    vectors.forEach(function (vector, index) {
      var row = document.createElement("tr");
      cell(row, String(index));
      cell(row, inputs[index].length > 60 ? inputs[index].slice(0, 57) + "…" : inputs[index]);
      cell(row, String(vector.length), "td", "num");
      cell(row, Math.sqrt(dot(vector, vector)).toFixed(4), "td", "num");
      cell(row, "[" + vector.slice(0, 6).map(function (v) { return v.toFixed(4); }).join(", ") + ", …]", "td", "small");
      body.appendChild(row);
    });
    var head = document.querySelector("#embed-similarity thead");
    var matrix = document.querySelector("#embed-similarity tbody");
    head.textContent = "";
    matrix.textContent = "";
    var top = document.createElement("tr");
    cell(top, "", "th");
    vectors.forEach(function (_, index) { cell(top, String(index), "th", "num").scope = "col"; });
    head.appendChild(top);
    vectors.forEach(function (a, i) {
      var row = document.createElement("tr");
      cell(row, String(i), "th").scope = "row";
      vectors.forEach(function (b) {
        var cosine = dot(a, b) / Math.sqrt(dot(a, a) * dot(b, b));
        cell(row, cosine.toFixed(3), "td", "num");
      });
      matrix.appendChild(row);
    });
    results.hidden = false;
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    var inputs = document.getElementById("inputs").value.split(/\r?\n/)
      .map(function (line) { return line.trim(); })
      .filter(function (line) { return line; });
    if (!inputs.length) return;
    var body = {
      model: form.dataset.model,
      input: inputs,
      encoding_format: document.getElementById("encoding_format").value
    };
    var dimensions = parseInt(document.getElementById("dimensions").value, 10);
    if (dimensions) body.dimensions = dimensions;
    button.disabled = true;
    failure.hidden = true;
    usage.textContent = "Embedding…";
    try {
      var response = await fetch(form.dataset.endpoint, {
        method: "POST",
        headers: { "Authorization": "Bearer " + form.dataset.key, "Content-Type": "application/json" },
        body: JSON.stringify(body)
      });
      var text = await response.text();
      var parsed = null;
      try { parsed = JSON.parse(text); } catch (ignored) { /* not JSON */ }
      if (!response.ok) {
        var message = parsed && parsed.error ? parsed.error.message : text;
        failure.textContent = message + " (HTTP " + response.status + ")";
        failure.hidden = false;
        usage.textContent = "";
        return;
      }
      show(inputs, parsed.data.map(function (item) { return vectorOf(item.embedding); }));
      usage.textContent = parsed.usage.prompt_tokens + " input tokens";
    } catch (error) {
      failure.textContent = "The request failed: " + error.message;
      failure.hidden = false;
      usage.textContent = "";
    } finally {
      button.disabled = false;
    }
  });
})();
