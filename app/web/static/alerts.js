// The models page shows the model's alerts when the API has any (GET .../alerts, signed in by the cookie).
(function () {
  const box = document.getElementById("alerts");
  if (!box) return;
  fetch(box.dataset.url, { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : null))
    .then((body) => {
      const items = Array.isArray(body) ? body : body && (body.items || body.alerts);
      if (!items || !items.length) return;
      const list = box.querySelector("ul");
      for (const a of items) {
        const li = document.createElement("li");
        li.textContent = typeof a === "string" ? a : a.message || a.detail || JSON.stringify(a);
        list.append(li);
      }
      box.hidden = false;
    })
    .catch(() => {});
})();
