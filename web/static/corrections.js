// Timeline page: "Upload corrected SEG" sends the chosen DICOM file as the request body (application/dicom),
// with the page's form token in X-CSRF; the answer is shown and the page reloaded with it.
document.querySelectorAll("form.upload-correction").forEach((form) => {
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = form.querySelector("input[type=file]").files[0];
    if (!file) return;
    const resp = await fetch("/corrections/upload", {
      method: "POST",
      headers: { "Content-Type": "application/dicom", "X-CSRF": form.dataset.csrf },
      body: file,
    });
    let detail = `upload failed (HTTP ${resp.status})`;
    try {
      const body = await resp.json();
      detail = body.detail || detail;
    } catch (_e) { /* not JSON */ }
    const url = new URL(window.location.href);
    url.searchParams.set("msg", detail);
    window.location.href = url.toString();
  });
});
