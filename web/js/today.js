// A plain page with today's date and this month's calendar: where the quick exit lands when the
// practice has not chosen a page of its own. It loads nothing from anywhere, keeps nothing, and
// says nothing about who came here or from where.

const now = new Date();
const locale = undefined; // the browser's own language
const full = new Intl.DateTimeFormat(locale, { weekday: "long", day: "numeric", month: "long", year: "numeric" });
document.getElementById("today").textContent = full.format(now);
document.getElementById("month-name").textContent = new Intl.DateTimeFormat(locale, {
  month: "long",
  year: "numeric",
}).format(now);

const weekday = new Intl.DateTimeFormat(locale, { weekday: "short" });
const monday = new Date(2024, 0, 1); // a Monday
const head = document.getElementById("weekdays");
for (let i = 0; i < 7; i++) {
  const th = document.createElement("th");
  th.scope = "col";
  th.textContent = weekday.format(new Date(2024, 0, monday.getDate() + i));
  head.append(th);
}

const first = new Date(now.getFullYear(), now.getMonth(), 1);
const days = new Date(now.getFullYear(), now.getMonth() + 1, 0).getDate();
const offset = (first.getDay() + 6) % 7; // weeks start on Monday
const body = document.getElementById("weeks");
let row = null;
for (let cell = 0; cell < offset + days; cell++) {
  if (cell % 7 === 0) {
    row = document.createElement("tr");
    body.append(row);
  }
  const td = document.createElement("td");
  const day = cell - offset + 1;
  if (day > 0) {
    td.textContent = String(day);
    if (day === now.getDate()) td.setAttribute("aria-current", "date");
  }
  row.append(td);
}
