// keygate console: the copy button beside a freshly shown key.
document.addEventListener("click", function (e) {
  var t = e.target;
  if (t && t.matches && t.matches("button[data-copy]")) {
    var el = document.getElementById(t.getAttribute("data-copy"));
    if (el && navigator.clipboard) {
      navigator.clipboard.writeText(el.textContent).then(function () { t.textContent = "Copied"; });
    }
  }
});
