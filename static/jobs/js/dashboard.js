/* Dashboard charts: made once, then fed from dashboard/data.json every 5 s.
   Chart.js (vendored, chart.umd.min.js) is loaded before this file. */
(function () {
  "use strict";
  var REFRESH_MS = 5000;
  var SERIES = [
    { key: "succeeded", label: "Succeeded", color: "#16a34a" },
    { key: "failed", label: "Failed", color: "#dc2626" },
    { key: "other", label: "Cancelled / lost", color: "#9ca3af" }
  ];

  function makeChart(canvas) {
    return new Chart(canvas, {
      type: "bar",
      data: {
        labels: [],
        datasets: SERIES.map(function (s) {
          return { label: s.label, data: [], backgroundColor: s.color, borderWidth: 0 };
        })
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        scales: {
          x: { stacked: true, ticks: { autoSkip: true, maxTicksLimit: 12, maxRotation: 0 } },
          y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } }
        }
      }
    });
  }

  function update(chart, period) {
    chart.data.labels = period.labels;
    SERIES.forEach(function (s, i) { chart.data.datasets[i].data = period.series[s.key]; });
    chart.update("none");
  }

  function start() {
    var box = document.getElementById("dash-charts");
    if (!box || typeof Chart === "undefined") { return; }
    var charts = {
      minute: makeChart(document.getElementById("chart-minute")),
      hour: makeChart(document.getElementById("chart-hour"))
    };
    function refresh() {
      fetch(box.dataset.url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.json();
        })
        .then(function (data) {
          update(charts.minute, data.minute);
          update(charts.hour, data.hour);
          box.dataset.updated = data.generated_at;
        })
        .catch(function (error) { box.dataset.error = String(error); });
    }
    refresh();
    setInterval(refresh, REFRESH_MS);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
