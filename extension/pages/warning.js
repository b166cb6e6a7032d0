// The warning page: which origin, and what differed (from the address the background built).
const params = new URLSearchParams(location.search);
document.getElementById("origin").textContent = params.get("origin") ?? "this site";
document.getElementById("code").textContent = params.get("code") ?? "";
document.getElementById("detail").textContent = params.get("detail") ?? "";
document.querySelector("main").dataset.code = params.get("code") ?? "";
