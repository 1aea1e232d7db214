/*
 * The task-run admin pages update themselves while runs are live, without a reload.
 *
 * Every second while a run shown on the page is live (every five when none is, only to
 * notice new runs), it asks the admin's live view for the cells of those runs and puts
 * each one in place; the server renders them, so a poll shows exactly what a reload
 * would. Polling stops while the tab is hidden. The row buttons (Cancel, Pause, Resume)
 * are sent without leaving the page, and what happened is said in a live region.
 * Without JavaScript the page still works: the buttons post a form and come back.
 */
(function () {
  "use strict";

  var LIVE_INTERVAL = 1000;
  var IDLE_INTERVAL = 5000;

  var settings = document.getElementById("tasksignal-live");
  if (!settings) {
    return;
  }
  var liveUrl = settings.dataset.url;
  var detail = settings.dataset.detail === "1";
  var newestOnLoad = parseInt(settings.dataset.newest || "0", 10);
  var status = document.getElementById("tasksignal-status");
  var newer = document.getElementById("tasksignal-newer");
  var form = document.getElementById("tasksignal-signal-form");
  var timer = null;
  var inFlight = false;

  // pk -> the element holding that run's cells: a row of the list, or the run's page.
  function containers() {
    var found = {};
    document.querySelectorAll("#result_list input.action-select").forEach(function (box) {
      found[box.value] = box.closest("tr");
    });
    document.querySelectorAll("[data-tasksignal-run]").forEach(function (element) {
      found[element.dataset.tasksignalRun] = element;
    });
    return found;
  }

  // On a run's page a cell is a read-only field: its value sits in ".readonly".
  function cellOf(container, name) {
    var cell = container.querySelector(".field-" + name);
    if (!cell) {
      return null;
    }
    return cell.querySelector(".readonly") || cell;
  }

  function announce(message, level) {
    if (!status) {
      return;
    }
    status.textContent = message;
    status.className = "ts-status ts-status-" + (level || "info");
  }

  function schedule(delay) {
    window.clearTimeout(timer);
    timer = window.setTimeout(poll, delay);
  }

  function poll() {
    if (document.hidden || inFlight) {
      return;
    }
    var shown = containers();
    var ids = Object.keys(shown);
    var url = liveUrl + "?ids=" + ids.join(",") + (detail ? "&detail=1" : "");
    inFlight = true;
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("the live view answered " + response.status);
        }
        return response.json();
      })
      .then(function (answer) {
        var live = false;
        Object.keys(answer.runs).forEach(function (pk) {
          var run = answer.runs[pk];
          var container = shown[pk];
          live = live || run.live;
          if (!container) {
            return;
          }
          container.classList.toggle("ts-live", run.live);
          Object.keys(run.cells).forEach(function (name) {
            var cell = cellOf(container, name);
            if (cell && cell.innerHTML !== run.cells[name]) {
              cell.innerHTML = run.cells[name];
            }
          });
        });
        if (newer && !detail && answer.newest > newestOnLoad) {
          newer.hidden = false;
        }
        inFlight = false;
        // A run's page whose run is over has nothing more to wait for.
        if (live || !detail) {
          schedule(live ? LIVE_INTERVAL : IDLE_INTERVAL);
        }
      })
      .catch(function (error) {
        inFlight = false;
        announce("Live updates paused: " + error.message + ". Retrying…", "warning");
        schedule(IDLE_INTERVAL);
      });
  }

  if (form) {
    form.addEventListener("submit", function (event) {
      var button = event.submitter;
      if (!button || !window.fetch) {
        return; // an old browser: let the form post and come back
      }
      event.preventDefault();
      button.disabled = true;
      fetch(button.formAction, {
        method: "POST",
        body: new FormData(form),
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      })
        .then(function (response) {
          return response
            .json()
            .catch(function () {
              return { level: "error", message: "Not sent (the server answered " + response.status + ")." };
            });
        })
        .then(function (answer) {
          announce(answer.message, answer.level);
          inFlight = false;
          poll();
        })
        .catch(function (error) {
          button.disabled = false;
          announce("Not sent: " + error.message, "error");
        });
    });
  }

  if (newer) {
    newer.querySelector("a").addEventListener("click", function (event) {
      event.preventDefault();
      window.location.reload();
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      poll();
    }
  });

  schedule(LIVE_INTERVAL);
})();
