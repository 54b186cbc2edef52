// The pair viewer: filter, page and open the pairs of the inline JSON index. Only one page of the
// list is in the DOM; the message texts are parsed the first time a pair is opened.
(function () {
  "use strict";
  var PAGE = 50;
  var index = JSON.parse(document.getElementById("pair-index").textContent);
  var rows = index.rows;  // [iteration, mode, outcome, task_id, chosen_reward, rejected_reward, prompt, chosen, rejected]
  var messages = null;
  var shown = [], page = 0, selected = -1;
  var $ = function (id) { return document.getElementById(id); };
  var ROLE = { a: "agent", u: "environment", s: "system" };

  function text(value) { return value === null || value === undefined ? "–" : String(value); }
  function reward(value) { return value === null || value === undefined ? "–" : Number(value).toFixed(2); }
  function el(tag, cls, content) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (content !== undefined) node.textContent = content;
    return node;
  }
  function msgs() {
    if (messages === null) messages = JSON.parse($("pair-messages").textContent);
    return messages;
  }

  function applyFilters() {
    var it = $("f-iter").value, outcome = $("f-outcome").value, mode = $("f-mode").value;
    var task = $("f-task").value.trim().toLowerCase();
    shown = [];
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      if (it !== "" && String(r[0]) !== it) continue;
      if (outcome !== "" && r[2] !== outcome) continue;
      if (mode !== "" && r[1] !== mode) continue;
      if (task !== "" && String(r[3]).toLowerCase().indexOf(task) < 0) continue;
      shown.push(i);
    }
    page = 0;
    renderList();
  }

  function renderList() {
    var body = $("pair-list"), pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    body.textContent = "";
    var start = page * PAGE;
    for (var j = start; j < Math.min(shown.length, start + PAGE); j++) {
      var i = shown[j], r = rows[i], tr = el("tr", "pair-item" + (i === selected ? " selected" : ""));
      tr.dataset.pair = i;
      tr.appendChild(el("td", "num", text(r[0])));
      var task = el("td", "task", text(r[3])); task.title = text(r[3]); tr.appendChild(task);
      tr.appendChild(el("td", "", r[1]));
      var td = el("td"); td.appendChild(el("span", "badge " + r[2], text(r[2]))); tr.appendChild(td);
      tr.appendChild(el("td", "num", reward(r[4])));
      tr.appendChild(el("td", "num", reward(r[5])));
      body.appendChild(tr);
    }
    var count = $("pair-count");
    count.textContent = shown.length + " of " + rows.length + " pairs";
    count.dataset.shown = shown.length;
    $("page").textContent = "page " + (page + 1) + " of " + pages;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
  }

  function message(id) {
    if (id === undefined) return el("div", "msg none", "");
    var m = msgs()[id], node = el("div", "msg " + m[0], m[1]);
    node.title = ROLE[m[0]] || m[0];
    return node;
  }

  function showPair(i) {
    selected = i;
    var r = rows[i], detail = $("pair-detail");
    detail.textContent = "";
    var h = el("h3", "", "task " + text(r[3]) + " · iteration " + text(r[0]) + " · " + r[1] + " ");
    h.appendChild(el("span", "badge " + r[2], text(r[2])));
    detail.appendChild(h);
    var chosen = r[7], rejected = r[8], first = -1;
    for (var t = 0; t < Math.max(chosen.length, rejected.length); t++) {
      if (chosen[t] !== rejected[t]) { first = t; break; }
    }
    var info = el("p", "note", "chosen reward " + reward(r[4]) + " · rejected reward " + reward(r[5]) + " · " +
      chosen.length + " vs " + rejected.length + " messages after the prompt · ");
    info.appendChild(first < 0 ? el("span", "", "identical") : el("span", "first-diff", "they part at turn " + (first + 1)));
    detail.appendChild(info);
    var prompt = el("details", "prompt");
    prompt.appendChild(el("summary", "", "prompt (" + r[6].length + " messages, shared by both sides)"));
    r[6].forEach(function (id) { prompt.appendChild(message(id)); });
    detail.appendChild(prompt);
    var grid = el("div", "turns");
    grid.appendChild(el("div", "head", "#"));
    grid.appendChild(el("div", "head chosen", "chosen · reward " + reward(r[4])));
    grid.appendChild(el("div", "head rejected", "rejected · reward " + reward(r[5])));
    var target = null;
    for (var k = 0; k < Math.max(chosen.length, rejected.length); k++) {
      var cls = k === first ? "diverge" : (first < 0 || k < first ? "same" : "");
      var idx = el("div", "idx " + cls, String(k + 1));
      var a = el("div", cls), b = el("div", cls);
      a.appendChild(message(chosen[k])); b.appendChild(message(rejected[k]));
      if (k === first) { a.id = "first-diff"; target = a; }
      grid.appendChild(idx); grid.appendChild(a); grid.appendChild(b);
    }
    detail.appendChild(grid);
    renderList();
    if (target && target.scrollIntoView && window.innerHeight < detail.getBoundingClientRect().bottom) {
      target.scrollIntoView({ block: "nearest" });
    }
  }

  ["f-iter", "f-outcome", "f-mode"].forEach(function (id) { $(id).addEventListener("change", applyFilters); });
  var timer = null;
  $("f-task").addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(applyFilters, 120); });
  $("prev").addEventListener("click", function () { page -= 1; renderList(); });
  $("next").addEventListener("click", function () { page += 1; renderList(); });
  $("pair-list").addEventListener("click", function (e) {
    var tr = e.target.closest("tr");
    if (tr && tr.dataset.pair !== undefined) showPair(Number(tr.dataset.pair));
  });
  applyFilters();
  // After the first paint: the list is usable before the message texts are parsed.
  if (shown.length) setTimeout(function () { if (selected < 0) showPair(shown[0]); }, 0);
})();
