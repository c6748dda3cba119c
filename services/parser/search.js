// index/search.js: the search box of index/index.html, over index/search.json (both written by the parser).
// Every value from the document reaches the page as text (textContent), never as markup; no eval, no inline code,
// no other origin: the page's CSP allows scripts and fetches from its own origin only.
"use strict";
(function () {
  var HEX = /^[0-9a-f]{64}$/;
  var SHOWN = 100;
  var box = document.getElementById("search");
  var input = document.getElementById("q");
  var said = document.getElementById("search-status");
  var list = document.getElementById("search-results");
  var off = document.getElementById("search-off");
  if (!box || !input || !said || !list) return;
  var digests = [];
  var ids = []; // [id in upper case, id, positions]

  function el(tag, value, cls) {
    var node = document.createElement(tag);
    node.textContent = String(value);
    if (cls) node.className = cls;
    return node;
  }

  function texts(value) {
    return Array.isArray(value) ? value.filter(function (x) { return typeof x === "string"; }) : [];
  }

  function count(counts, severity) {
    var n = counts && typeof counts === "object" ? Number(counts[severity]) : 0;
    return Number.isFinite(n) ? n : 0;
  }

  function matches(query) {
    var q = query.trim().toLowerCase();
    var found = new Map(); // position in digests -> why it matched
    if (q.length < 2) return found;
    function add(i, why) {
      if (!found.has(i)) found.set(i, []);
      var reasons = found.get(i);
      if (reasons.length < 5 && reasons.indexOf(why) < 0) reasons.push(why);
    }
    var hex = q.replace(/^sha256:/, "");
    var byDigest = /^[0-9a-f]{6,64}$/.test(hex);
    digests.forEach(function (d, i) {
      if (byDigest && typeof d.digest === "string" && d.digest.indexOf(hex) === 0) add(i, "digest");
      texts(d.images).forEach(function (image) {
        if (image.toLowerCase().indexOf(q) >= 0) add(i, "image " + image);
      });
      if (typeof d.digest_ref === "string" && d.digest_ref.toLowerCase().indexOf(q) >= 0) add(i, "repository");
      (Array.isArray(d.workloads) ? d.workloads : []).forEach(function (w) {
        if (!w || typeof w !== "object") return;
        var ns = String(w.namespace), name = String(w.kind) + "/" + String(w.name);
        if (ns.toLowerCase().indexOf(q) >= 0) add(i, "namespace " + ns);
        if (name.toLowerCase().indexOf(q) >= 0) add(i, "workload " + ns + "/" + name);
      });
    });
    var upper = q.toUpperCase();
    ids.forEach(function (entry) {
      if (entry[0].indexOf(upper) < 0) return;
      entry[2].forEach(function (i) { add(i, entry[1]); });
    });
    return found;
  }

  function worstFirst(a, b) {
    var ca = digests[a].counts, cb = digests[b].counts;
    if (!ca !== !cb) return ca ? -1 : 1;
    return (count(cb, "CRITICAL") - count(ca, "CRITICAL")) || (count(cb, "HIGH") - count(ca, "HIGH")) || a - b;
  }

  function row(i, reasons) {
    var d = digests[i];
    var item = document.createElement("li");
    var images = texts(d.images);
    var label = images.length ? images.join(", ") : String(d.digest_ref);
    if (d.counts) {
      if (typeof d.digest === "string" && HEX.test(d.digest)) {
        var link = el("a", label);
        link.href = "digests/" + d.digest + ".html";
        item.appendChild(link);
      } else {
        item.appendChild(el("span", label));
      }
      var counts = ["CRITICAL", "HIGH", "MEDIUM", "LOW"].map(function (s) {
        return count(d.counts, s) + " " + s.toLowerCase();
      });
      item.appendChild(el("span", " " + counts.join(", ")));
    } else {
      item.appendChild(el("span", label));
      item.appendChild(el("span", " no report yet", "muted"));
    }
    var namespaces = [];
    (Array.isArray(d.workloads) ? d.workloads : []).forEach(function (w) {
      var ns = w && typeof w === "object" ? String(w.namespace) : "";
      if (ns && namespaces.indexOf(ns) < 0) namespaces.push(ns);
    });
    if (namespaces.length) item.appendChild(el("span", " in " + namespaces.join(", ")));
    item.appendChild(el("div", "matched: " + reasons.join("; "), "muted"));
    return item;
  }

  function show(query) {
    var found = matches(query);
    var order = Array.from(found.keys()).sort(worstFirst);
    list.replaceChildren();
    order.slice(0, SHOWN).forEach(function (i) { list.appendChild(row(i, found.get(i))); });
    if (!query.trim()) said.textContent = digests.length + " digests; type two or more characters";
    else if (order.length > SHOWN) said.textContent = order.length + " digests match; the worst " + SHOWN + " are shown";
    else said.textContent = order.length + (order.length === 1 ? " digest matches" : " digests match");
  }

  function fromHash() {
    if (location.hash.indexOf("#q=") !== 0) return "";
    try {
      return decodeURIComponent(location.hash.slice(3));
    } catch (e) {
      return "";
    }
  }

  function ready(doc) {
    if (!doc || typeof doc !== "object" || !Array.isArray(doc.digests)) throw new Error("search.json is not a search index");
    digests = doc.digests.filter(function (d) { return d && typeof d === "object"; });
    // id -> the digests that have it, from each digest's positions in the id table.
    var table = Array.isArray(doc.vulnerability_ids) ? doc.vulnerability_ids : [];
    var holders = table.map(function () { return []; });
    digests.forEach(function (d, i) {
      (Array.isArray(d.vulnerabilities) ? d.vulnerabilities : []).forEach(function (n) {
        if (Number.isInteger(n) && n >= 0 && n < holders.length) holders[n].push(i);
      });
    });
    ids = table.map(function (id, n) { return [String(id).toUpperCase(), String(id), holders[n]]; })
      .filter(function (entry) { return entry[2].length > 0; });
    if (off) off.hidden = true;
    box.hidden = false;
    input.addEventListener("input", function () {
      history.replaceState(null, "", input.value ? "#q=" + encodeURIComponent(input.value) : location.pathname);
      show(input.value);
    });
    input.value = fromHash();
    show(input.value);
  }

  fetch("search.json", { cache: "no-cache", credentials: "same-origin" })
    .then(function (response) {
      if (!response.ok) throw new Error("search.json: HTTP " + response.status);
      return response.json();
    })
    .then(ready)
    .catch(function (error) {
      var why = String(error && error.message ? error.message : error);
      if (off) off.appendChild(document.createTextNode(" (" + why + ")"));
    });
})();
