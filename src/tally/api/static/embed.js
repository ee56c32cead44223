"use strict";
// Tally's embedded widget (CONTRACT §9; tally.api.embed_page). Served by Tally, no inline
// script: reads the data URL, chart and refresh period from #tally-embed, fetches the data
// (GET /embed/<token>/data: shaped server-side by tally.embeds.charts), and draws it — a line
// (uPlot), bars or a funnel (HTML), always with the same data as a table. Text is set with
// textContent only: keys come from event data.
(function () {
  var root = document.getElementById("tally-embed");
  if (!root) { return; }
  var src = root.dataset.src;
  var chart = root.dataset.chart;
  var refresh = parseInt(root.dataset.refresh || "0", 10);
  var chartBox = document.getElementById("chart");
  var tableBox = document.getElementById("table");
  var statusBox = document.getElementById("status");
  var markBox = document.getElementById("watermark");
  var COLORS = ["#1f6fb4", "#c0392b", "#2e8b57", "#d9730d", "#7b4fb0", "#8c564b",
                "#c2418f", "#5f6b73", "#8a8d00", "#128a9c"];
  var plot = null;
  var lastTag = null;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function formatter(data) {
    if (data.unit === "money" && data.currency) {
      var money = null;
      try {
        money = new Intl.NumberFormat(undefined, {style: "currency", currency: data.currency});
      } catch (e) { money = null; }
      var digits = money ? money.resolvedOptions().maximumFractionDigits : 2;
      return function (v) {
        if (v === null || v === undefined) { return "–"; }
        var major = v / Math.pow(10, digits);
        return money ? money.format(major) : major.toFixed(digits) + " " + data.currency;
      };
    }
    if (data.unit === "share") {
      return function (v) {
        return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%";
      };
    }
    var plain = new Intl.NumberFormat(undefined, {maximumFractionDigits: 4});
    return function (v) { return v === null || v === undefined ? "–" : plain.format(v); };
  }

  function cell(column, value, fmt) {
    if (value === null || value === undefined) { return "–"; }
    if (/_minor(_d\d+)?$/.test(column)) { return fmt(value); }
    if (typeof value === "boolean") { return value ? "yes" : "no"; }
    return String(value);
  }

  function drawTable(data, fmt) {
    var table = el("table");
    var caption = el("caption", "visually-hidden", document.getElementById("title").textContent);
    table.appendChild(caption);
    var head = el("thead");
    var row = el("tr");
    data.columns.forEach(function (c) {
      var th = el("th", null, c);
      th.scope = "col";
      row.appendChild(th);
    });
    head.appendChild(row);
    table.appendChild(head);
    var body = el("tbody");
    data.rows.forEach(function (values) {
      var tr = el("tr");
      values.forEach(function (v, i) { tr.appendChild(el("td", null, cell(data.columns[i], v, fmt))); });
      body.appendChild(tr);
    });
    table.appendChild(body);
    tableBox.replaceChildren(table);
  }

  function legend(data) {
    var list = el("ul", "legend");
    data.series.forEach(function (s, i) {
      var item = el("li", "legend-item");
      var swatch = el("span", "swatch swatch-" + (i % COLORS.length));
      swatch.setAttribute("aria-hidden", "true");
      item.appendChild(swatch);
      item.appendChild(el("span", null, s.name));
      list.appendChild(item);
    });
    return list;
  }

  function size() {
    var width = Math.max(240, chartBox.clientWidth || 320);
    return {width: width, height: Math.round(Math.min(360, Math.max(180, width * 0.5)))};
  }

  function drawPlot(data, fmt, bars) {
    var xs = data.x.values;
    var byIndex = data.x.kind === "category";
    var x = byIndex ? xs.map(function (_, i) { return i; }) : xs;
    var n = data.series.length;
    var series = [{label: data.x.name,
                   value: byIndex ? function (u, v) { return v === null ? "" : xs[v]; } : undefined}];
    data.series.forEach(function (s, i) {
      var color = COLORS[i % COLORS.length];
      series.push({
        label: s.name, stroke: color, width: bars ? 1 : 2,
        fill: bars ? color : undefined,
        // two series side by side; more overlap, each drawn thinner than the one before
        paths: bars ? uPlot.paths.bars({size: [n === 2 ? 0.45 : 0.8 / (1 + i * 0.5), Infinity],
                                        align: n === 2 ? (i === 0 ? -1 : 1) : 0}) : undefined,
        points: {show: !bars && xs.length < 60},
        value: function (u, v) { return fmt(v); }
      });
    });
    var opts = Object.assign(size(), {
      series: series,
      scales: {x: {time: data.x.kind === "time",
                   range: byIndex ? function (u, lo, hi) { return [lo - 0.5, hi + 0.5]; } : undefined}},
      axes: [
        {values: byIndex ? function (u, splits) {
          return splits.map(function (v) { return Number.isInteger(v) && xs[v] !== undefined ? xs[v] : ""; });
        } : undefined},
        {size: 90, values: function (u, splits) { return splits.map(fmt); }}
      ],
      legend: {show: true},
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); }  // UTC
    });
    if (plot) { plot.destroy(); }
    chartBox.replaceChildren();
    plot = new uPlot(opts, [x].concat(data.series.map(function (s) { return s.values; })), chartBox);
  }

  function drawBars(data, fmt, funnel) {
    // categories down the page, a bar per series: readable on a phone, and text for readers
    var values = [];
    data.series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null) { values.push(Math.abs(v)); } }); });
    var top = values.length ? Math.max.apply(null, values) : 0;
    var list = el("ol", funnel ? "bars funnel" : "bars");
    data.x.values.forEach(function (label, row) {
      var item = el("li", "bar-row");
      item.appendChild(el("span", "bar-label", label));
      data.series.forEach(function (s, i) {
        var v = s.values[row];
        var track = el("span", "bar-track");
        var fill = el("span", "bar-fill swatch-" + (i % COLORS.length));
        fill.style.width = (top > 0 && v !== null ? Math.max(0.5, 100 * Math.abs(v) / top) : 0) + "%";
        track.appendChild(fill);
        var text = fmt(v);
        if (funnel && row > 0 && data.series[0].values[0]) {
          text += " (" + (100 * (v || 0) / data.series[0].values[0]).toFixed(1) + "%)";
        }
        var value = el("span", "bar-value", (data.series.length > 1 ? s.name + ": " : "") + text);
        var bar = el("span", "bar");
        bar.appendChild(track);
        bar.appendChild(value);
        item.appendChild(bar);
      });
      list.appendChild(item);
    });
    chartBox.replaceChildren(list);
    if (data.series.length > 1) { chartBox.appendChild(legend(data)); }
  }

  function describe(data) {
    var parts = [data.x.values.length + " " + (data.x.kind === "time" ? "points" : "rows"),
                 data.series.length + " series"];
    if (data.omitted) { parts.push(data.omitted + " more series in the table"); }
    if (data.more) { parts.push("more rows exist than are shown"); }
    return parts.join(", ");
  }

  function draw(data) {
    var fmt = formatter(data);
    root.dataset.series = String(data.series.length);
    if (chartBox) {
      if (chart === "line" || (chart === "bar" && data.x.kind === "time")) {
        drawPlot(data, fmt, chart === "bar");
      } else {
        drawBars(data, fmt, chart === "funnel");
      }
    }
    drawTable(data, fmt);
    markBox.textContent = data.watermark;
    markBox.setAttribute("datetime", data.watermark);
    statusBox.textContent = describe(data);
    statusBox.classList.remove("error");
    root.dataset.state = "ready";
  }

  function fail(message) {
    statusBox.textContent = message;
    statusBox.classList.add("error");
    root.dataset.state = "error";
  }

  function load() {
    fetch(src, {cache: "no-cache", credentials: "omit", referrerPolicy: "no-referrer",
                headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) {
          return response.json().then(function (problem) {
            throw new Error(problem.detail || ("HTTP " + response.status));
          }, function () { throw new Error("HTTP " + response.status); });
        }
        var tag = response.headers.get("ETag");
        if (tag && tag === lastTag) { return null; }  // revalidated: nothing changed
        lastTag = tag;
        return response.json();
      })
      .then(function (data) { if (data) { draw(data); } })
      .catch(function (error) { fail("The data could not be loaded: " + error.message); })
      .finally(function () { if (refresh > 0) { setTimeout(load, refresh * 1000); } });
  }

  window.addEventListener("resize", function () {
    if (plot) { plot.setSize(size()); }
  });
  load();
})();
