// segkit data set page: the filtered, paged grid of thumbnails, the detail view and the findings list.
//
// Every image's record and every finding come from data.js (window.segkitDataset, written by
// segkit/reporting/dataset_page.py, whose page_data() documents the arrays). Only one page of thumbnails
// is in the document at a time, so a 20,000-image set opens at once. Names from files are only ever written
// as text (textContent, setAttribute), never parsed as HTML.
(function () {
  "use strict";

  const PAGE_SIZE = 60; // thumbnails drawn at a time
  const FINDINGS_STEP = 200; // findings listed at first, and added by "show more"
  const data = window.segkitDataset;
  document.documentElement.classList.replace("no-js", "js");
  const grid = document.getElementById("grid");
  if (!data) {
    grid.textContent = "data.js did not load: no images to show";
    return;
  }

  // Record fields (dataset_page.py page_data).
  const SPLIT = 0, INDEX = 1, NAME = 2, WIDTH = 3, HEIGHT = 4, PATH = 5, IGNORE = 6, PIXELS = 7;
  const images = data.images;
  const findingsOf = images.map(() => []);
  data.findings.forEach((finding, at) => {
    if (finding[3] >= 0) {
      findingsOf[finding[3]].push(at);
    }
  });

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) {
      node.textContent = text;
    }
    if (className) {
      node.className = className;
    }
    return node;
  }

  function swatch(classId) {
    const span = element("span", undefined, "swatch");
    span.style.background = data.colors[classId] || "#000";
    return span;
  }

  function keyOf(at) {
    return encodeURIComponent(data.splits[images[at][SPLIT]]) + "/" + images[at][INDEX];
  }

  const byKey = new Map(images.map((_, at) => [keyOf(at), at]));

  function hasClass(at, classId) {
    const pixels = images[at][PIXELS];
    for (let i = 0; i < pixels.length; i += 2) {
      if (pixels[i] === classId) {
        return pixels[i + 1] > 0;
      }
    }
    return false;
  }

  function percent(value) {
    return (100 * value).toFixed(value < 0.001 && value > 0 ? 3 : 1) + "%";
  }

  // ------------------------------------------------------------------ filters and the paged grid
  const splitSelect = document.getElementById("filter-split");
  const classSelect = document.getElementById("filter-class");
  const findingsBox = document.getElementById("filter-findings");
  const previousPage = document.getElementById("page-previous");
  const nextPage = document.getElementById("page-next");
  const range = document.getElementById("page-range");
  const view = {order: [], page: 0, current: -1};

  function applyFilters() {
    const split = Number(splitSelect.value);
    const classId = Number(classSelect.value);
    const flaggedOnly = findingsBox.checked;
    view.order = [];
    for (let at = 0; at < images.length; at += 1) {
      if ((split < 0 || images[at][SPLIT] === split) && (classId < 0 || hasClass(at, classId))
          && (!flaggedOnly || findingsOf[at].length > 0)) {
        view.order.push(at);
      }
    }
    view.page = 0;
    drawGrid();
  }

  function thumbnail(at) {
    const record = images[at];
    const button = element("button", undefined, "thumb");
    button.type = "button";
    button.dataset.image = String(at);
    button.dataset.key = keyOf(at);
    button.setAttribute("aria-label", record[NAME] + (findingsOf[at].length ? " (has findings)" : ""));
    if (findingsOf[at].length) {
      button.classList.add("flagged");
    }
    const scale = Math.min(1, data.thumb / Math.max(record[WIDTH], record[HEIGHT], 1));
    const img = element("img");
    img.setAttribute("src", "thumbs/" + record[PATH] + ".jpg");
    img.setAttribute("alt", "");
    img.setAttribute("width", String(Math.max(1, Math.round(record[WIDTH] * scale))));
    img.setAttribute("height", String(Math.max(1, Math.round(record[HEIGHT] * scale))));
    img.setAttribute("loading", "lazy");
    button.append(img, element("span", record[NAME], "name"));
    return button;
  }

  function drawGrid() {
    const pages = Math.max(1, Math.ceil(view.order.length / PAGE_SIZE));
    view.page = Math.max(0, Math.min(view.page, pages - 1));
    const start = view.page * PAGE_SIZE;
    const shown = view.order.slice(start, start + PAGE_SIZE);
    grid.replaceChildren(...shown.map(thumbnail));
    range.textContent = shown.length
      ? (start + 1) + "\u2013" + (start + shown.length) + " of " + view.order.length
        + " (page " + (view.page + 1) + " of " + pages + ")"
      : "no image matches";
    previousPage.disabled = view.page === 0;
    nextPage.disabled = start + PAGE_SIZE >= view.order.length;
  }

  function thumbButtons() {
    return Array.from(grid.querySelectorAll("button.thumb"));
  }

  splitSelect.addEventListener("change", applyFilters);
  classSelect.addEventListener("change", applyFilters);
  findingsBox.addEventListener("change", applyFilters);
  previousPage.addEventListener("click", () => {
    view.page -= 1;
    drawGrid();
  });
  nextPage.addEventListener("click", () => {
    view.page += 1;
    drawGrid();
  });
  grid.addEventListener("click", (event) => {
    const button = event.target.closest("button.thumb");
    if (button) {
      openImage(Number(button.dataset.image));
    }
  });
  // Arrow keys move between the thumbnails of the page (Enter or Space opens the focused one).
  grid.addEventListener("keydown", (event) => {
    const buttons = thumbButtons();
    const at = buttons.indexOf(document.activeElement);
    const targets = {ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: buttons.length - 1};
    if (at < 0 || !(event.key in targets)) {
      return;
    }
    event.preventDefault();
    buttons[Math.max(0, Math.min(buttons.length - 1, targets[event.key]))].focus();
  });

  // ------------------------------------------------------------------ the detail view
  const dialog = document.getElementById("detail");
  const stage = document.getElementById("detail-stage");
  const picture = document.getElementById("detail-image");
  const maskLayer = document.getElementById("detail-mask");
  const opacity = document.getElementById("detail-opacity");
  const toggle = document.getElementById("detail-toggle");
  const legend = document.getElementById("legend");
  const detailFindings = document.getElementById("detail-findings");

  function setOpacity() {
    maskLayer.style.opacity = String(Number(opacity.value) / 100);
  }

  function setMaskOnly(on) {
    stage.classList.toggle("mask-only", on);
    toggle.setAttribute("aria-pressed", String(on));
    toggle.textContent = on ? "show the image" : "show the mask only";
  }

  // The images the arrows step through: the filtered ones, or all when the open one is filtered out.
  function sequence() {
    return view.order.includes(view.current) ? view.order : images.map((_, at) => at);
  }

  function openImage(at) {
    if (!(at >= 0 && at < images.length)) {
      return;
    }
    view.current = at;
    const record = images[at];
    document.getElementById("detail-name").textContent = record[NAME];
    const order = sequence();
    document.getElementById("detail-position").textContent =
      (order.indexOf(at) + 1) + " of " + order.length + " \u00b7 " + data.splits[record[SPLIT]];
    document.getElementById("detail-size").textContent = record[WIDTH] + " \u00d7 " + record[HEIGHT] + " pixels";
    stage.style.setProperty("--aspect", String(record[WIDTH] / Math.max(record[HEIGHT], 1)));
    stage.classList.toggle("small", Math.max(record[WIDTH], record[HEIGHT]) < 512);
    picture.setAttribute("src", "images/" + record[PATH] + ".jpg");
    picture.setAttribute("alt", record[NAME]);
    maskLayer.setAttribute("src", "masks/" + record[PATH] + ".png");
    maskLayer.setAttribute("alt", record[NAME] + " mask");
    drawLegend(record);
    drawDetailFindings(at);
    setOpacity();
    if (!dialog.open) {
      dialog.showModal();
    }
    dialog.focus();
    const key = "#" + keyOf(at);
    if (location.hash !== key) {
      history.replaceState(null, "", key);
    }
  }

  function drawLegend(record) {
    const pixels = record[PIXELS];
    let labelled = 0;
    for (let i = 1; i < pixels.length; i += 2) {
      labelled += pixels[i];
    }
    const rows = [];
    for (let i = 0; i < pixels.length; i += 2) {
      rows.push([pixels[i], pixels[i + 1] / Math.max(labelled, 1)]);
    }
    rows.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
    legend.replaceChildren(...rows.map(([classId, share]) => {
      const row = element("li", undefined, "legend-row");
      row.dataset.class = String(classId);
      row.dataset.share = String(share);
      row.append(swatch(classId), element("span", data.classes[classId], "class-name"),
        element("span", percent(share), "share"));
      return row;
    }));
    if (rows.length === 0) {
      legend.append(element("li", "no labelled pixel"));
    }
    const total = labelled + record[IGNORE];
    document.getElementById("detail-ignore").textContent =
      record[IGNORE] ? "ignored: " + percent(record[IGNORE] / total) + " of the image's pixels" : "";
  }

  function drawDetailFindings(at) {
    detailFindings.replaceChildren(...findingsOf[at].map((index) => {
      const finding = data.findings[index];
      return element("li", (finding[2] ? "warning: " : "") + finding[1], finding[2] ? "warning" : "error");
    }));
    if (findingsOf[at].length === 0) {
      detailFindings.append(element("li", "none"));
    }
  }

  function step(offset) {
    const order = sequence();
    const position = order.indexOf(view.current);
    const target = order[Math.max(0, Math.min(order.length - 1, position + offset))];
    if (target !== undefined && target !== view.current) {
      openImage(target);
    }
  }

  // Back in the grid: the page holding the image last shown, its thumbnail focused.
  function closed() {
    history.replaceState(null, "", location.pathname + location.search);
    const position = view.order.indexOf(view.current);
    if (position < 0) {
      return;
    }
    if (Math.floor(position / PAGE_SIZE) !== view.page) {
      view.page = Math.floor(position / PAGE_SIZE);
      drawGrid();
    }
    grid.querySelector("button.thumb[data-image='" + view.current + "']")?.focus();
  }

  opacity.addEventListener("input", setOpacity);
  toggle.addEventListener("click", () => setMaskOnly(toggle.getAttribute("aria-pressed") !== "true"));
  document.getElementById("detail-previous").addEventListener("click", () => step(-1));
  document.getElementById("detail-next").addEventListener("click", () => step(1));
  document.getElementById("detail-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", closed);
  dialog.addEventListener("keydown", (event) => {
    if (event.target === opacity && (event.key === "ArrowLeft" || event.key === "ArrowRight")) {
      return; // the slider's own keys
    }
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      event.preventDefault();
      step(event.key === "ArrowRight" ? 1 : -1);
    } else if (event.key === "m" || event.key === "M") {
      setMaskOnly(toggle.getAttribute("aria-pressed") !== "true");
    }
  });

  // ------------------------------------------------------------------ findings, linked to their images
  const findingsList = document.getElementById("findings");
  const moreFindings = document.getElementById("findings-more");
  let findingsShown = 0;

  function findingItem(finding) {
    const item = element("li", undefined, finding[2] ? "warning" : "error");
    const split = finding[0] >= 0 ? data.splits[finding[0]] + ": " : "";
    item.append(element("span", split + (finding[2] ? "warning: " : ""), "meta"));
    if (finding[3] >= 0) {
      const link = element("a", finding[1]);
      link.setAttribute("href", "#" + keyOf(finding[3]));
      link.dataset.image = String(finding[3]);
      item.append(link);
    } else {
      item.append(element("span", finding[1]));
    }
    return item;
  }

  function drawMoreFindings() {
    const next = data.findings.slice(findingsShown, findingsShown + FINDINGS_STEP);
    findingsList.append(...next.map(findingItem));
    findingsShown += next.length;
    moreFindings.hidden = findingsShown >= data.findings.length;
    if (data.findings.length === 0) {
      findingsList.replaceChildren(element("li", "no problems found"));
    }
  }

  moreFindings.addEventListener("click", drawMoreFindings);
  findingsList.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-image]");
    if (link) {
      event.preventDefault();
      openImage(Number(link.dataset.image));
    }
  });

  function openFromHash() {
    const at = byKey.get(location.hash.slice(1));
    if (at !== undefined) {
      openImage(at);
    }
  }

  window.addEventListener("hashchange", openFromHash);
  applyFilters();
  drawMoreFindings();
  openFromHash();
})();
