// The job page follows the job's event stream (the API's SSE, signed in by the session cookie): each event
// is listed and asks htmx to refresh the server-rendered progress; a final status ends the stream and
// reloads the page (which then shows the report).
(function () {
  const box = document.getElementById("progress");
  if (!box || box.dataset.terminal === "yes") return;
  const list = document.getElementById("events");
  const source = new EventSource(`/api/v1/jobs/${box.dataset.job}/events`);
  const finals = ["succeeded", "failed", "cancelled"];
  function show(kind, data) {
    const item = document.createElement("li");
    let text = kind;
    if (kind === "epoch") text = `${data.stage} epoch ${data.epoch}/${data.epochs}: test ${data.test_acc.toFixed(2)} %, train ${data.train_acc.toFixed(2)} %`;
    else if (kind === "progress") text = `audit ${data.done}/${data.total} ${data.message || ""}`;
    else if (kind === "status") text = `status ${data.status}`;
    else if (data.message) text = `${kind}: ${data.message}`;
    item.textContent = text;
    list.prepend(item);
    while (list.children.length > 30) list.lastChild.remove();
  }
  for (const kind of ["status", "epoch", "progress", "warning"]) {
    source.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data).data;
      show(kind, data);
      document.body.dispatchEvent(new Event("job-event"));
      if (kind === "status" && finals.includes(data.status)) {
        source.close();
        setTimeout(() => window.location.reload(), 800);
      }
    });
  }
})();
