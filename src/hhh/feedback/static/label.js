// Keyboard ranking for /label: digits pick answers best-first, "t" ties the next pick with the previous one,
// Shift+digit flags unsafe, Backspace undoes, "r" resets, Enter submits, "s" skips.
(function () {
  const form = document.getElementById("ranking-form");
  if (!form) return;
  const cards = Array.from(form.querySelectorAll(".completion"));
  const select = (card) => card.querySelector("select");
  let picks = [];   // [{card, rank}] in the order chosen
  let tieNext = false;

  cards.forEach((card) => { if (select(card).value) picks.push({ card, rank: +select(card).value }); });
  picks.sort((a, b) => a.rank - b.rank);

  function paint() {
    cards.forEach((card) => {
      card.classList.toggle("ranked", !!select(card).value);
      card.classList.toggle("flagged", card.querySelector("input[name=unsafe]").checked);
    });
  }
  function pick(card) {
    if (select(card).value) return;
    const last = picks.length ? picks[picks.length - 1].rank : 0;
    const rank = tieNext && last ? last : picks.length + 1;
    tieNext = false;
    select(card).value = String(rank);
    picks.push({ card, rank });
    paint();
  }
  function undo() {
    const last = picks.pop();
    if (last) select(last.card).value = "";
    paint();
  }
  function reset() {
    picks = []; tieNext = false;
    cards.forEach((card) => { select(card).value = ""; });
    paint();
  }
  form.addEventListener("submit", () => { document.getElementById("submit").disabled = true; });
  document.getElementById("reset").addEventListener("click", reset);
  cards.forEach((card) => select(card).addEventListener("change", () => {
    picks = cards.filter((c) => select(c).value).map((c) => ({ card: c, rank: +select(c).value }));
    picks.sort((a, b) => a.rank - b.rank);
    paint();
  }));
  form.querySelectorAll("input[name=unsafe]").forEach((box) => box.addEventListener("change", paint));

  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.tagName === "BUTTON" && e.key === "Enter") return;  // the button submits by itself
    const digit = /^Digit([1-9])$/.exec(e.code);
    if (digit && +digit[1] <= cards.length) {
      const card = cards[+digit[1] - 1];
      if (e.shiftKey) {
        const box = card.querySelector("input[name=unsafe]");
        box.checked = !box.checked;
        paint();
      } else {
        pick(card);
      }
      e.preventDefault();
    } else if (e.key === "t") {
      tieNext = true;
    } else if (e.key === "Backspace") {
      undo(); e.preventDefault();
    } else if (e.key === "r") {
      reset();
    } else if (e.key === "Enter") {
      e.preventDefault(); form.requestSubmit();
    } else if (e.key === "s") {
      document.getElementById("skip-form").requestSubmit();
    }
  });
  paint();
})();
