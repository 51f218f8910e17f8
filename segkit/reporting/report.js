// segkit evaluation report: sorting, the per-class side panel and the table of every image.
//
// Progressive enhancement over report.html's plain tables (segkit/reporting/browsing.py). The numbers of
// every image come from data.js (window.segkitReport). Names from files are only ever written as text
// (textContent, setAttribute), never parsed as HTML.
(function () {
  "use strict";

  const PAGE_SIZE = 25; // rows of the images table drawn at a time: a 5000-image report opens at once
  const data = window.segkitReport;
  document.documentElement.classList.replace("no-js", "js");

  function formatted(value) {
    return value === null || value === undefined ? "n/a" : value.toFixed(4);
  }

  // Ascending (direction 1) or descending (-1); no value (null) last either way.
  function compareNumbers(a, b, direction) {
    if (a === null || b === null) {
      return (a === null) - (b === null);
    }
    return direction * (a - b);
  }

  // A header's first press sorts ascending, the next descending, and so on.
  function nextDirection(button) {
    return button.closest("th").getAttribute("aria-sort") === "ascending" ? -1 : 1;
  }

  function markSorted(head, button, direction) {
    for (const th of head.querySelectorAll("th")) {
      th.removeAttribute("aria-sort");
    }
    button.closest("th").setAttribute("aria-sort", direction > 0 ? "ascending" : "descending");
  }

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

  // ------------------------------------------------------------------ side panel: classes
  const classTable = document.getElementById("panel-classes");
  const classBody = classTable.tBodies[0];
  const worstTitle = document.getElementById("class-worst-title");
  const worstList = document.getElementById("class-worst");

  function classButtons() {
    return Array.from(classBody.querySelectorAll("button.class-pick"));
  }

  function classValue(row, key) {
    return row.dataset[key] === "" ? null : Number(row.dataset[key]);
  }

  function sortClasses(key, direction) {
    const rows = Array.from(classBody.rows);
    rows.sort((a, b) => {
      const order = key === "name"
        ? direction * a.dataset.name.localeCompare(b.dataset.name)
        : compareNumbers(classValue(a, key), classValue(b, key), direction);
      return order || Number(a.dataset.class) - Number(b.dataset.class);
    });
    classBody.append(...rows);
  }

  // One class button in the tab order (the chosen or last focused one); arrow keys move between them.
  function makeCurrent(button) {
    for (const other of classButtons()) {
      other.tabIndex = other === button ? 0 : -1;
    }
  }

  function chooseClass(button) {
    const row = button.closest("tr");
    const classIndex = Number(row.dataset.class);
    for (const other of classButtons()) {
      other.setAttribute("aria-pressed", String(other === button));
    }
    makeCurrent(button);
    worstTitle.textContent = "Lowest IoU of " + row.dataset.name;
    if (!data) {
      worstList.replaceChildren(element("li", "data.js did not load: no per-image numbers"));
      return;
    }
    const indices = data.worst_per_class[classIndex];
    worstList.replaceChildren(...indices.map((index) => worstItem(index, classIndex)));
    if (indices.length === 0) {
      worstList.append(element("li", "in no image's ground truth or prediction"));
    }
  }

  function worstItem(imageIndex, classIndex) {
    const image = data.images[imageIndex];
    const iou = image.per_class_iou[classIndex];
    const item = element("li");
    item.dataset.image = String(imageIndex);
    item.dataset.iou = String(iou);
    const link = element("a", image.filename);
    link.href = "#image-" + imageIndex;
    item.append(link, " ", element("span", "IoU " + formatted(iou), "meta"));
    return item;
  }

  classTable.tHead.addEventListener("click", (event) => {
    const button = event.target.closest("button.sort");
    if (button) {
      const direction = nextDirection(button);
      sortClasses(button.dataset.sort, direction);
      markSorted(classTable.tHead, button, direction);
    }
  });

  classBody.addEventListener("click", (event) => {
    const button = event.target.closest("button.class-pick");
    if (button) {
      chooseClass(button);
    }
  });

  classBody.addEventListener("keydown", (event) => {
    const buttons = classButtons();
    const at = buttons.indexOf(document.activeElement);
    const targets = {ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: buttons.length - 1};
    if (at < 0 || !(event.key in targets)) {
      return;
    }
    event.preventDefault(); // the arrow keys move between classes instead of scrolling the panel
    const target = buttons[Math.max(0, Math.min(buttons.length - 1, targets[event.key]))];
    makeCurrent(target);
    target.focus();
  });

  makeCurrent(classButtons()[0]);

  // ------------------------------------------------------------------ the table of every image
  const imageTable = document.getElementById("images");
  const previous = document.getElementById("images-previous");
  const next = document.getElementById("images-next");
  const range = document.getElementById("images-range");
  const view = {key: "miou", direction: 1, page: 0, order: []};

  function sortImages() {
    view.order = data.images.map((_, index) => index);
    view.order.sort((a, b) => compareNumbers(data.images[a][view.key], data.images[b][view.key], view.direction)
      || a - b);
  }

  // Width and height keep the picture's room before it loads, so a link to a row further down lands there.
  function picture(figure, alt) {
    const img = element("img");
    img.setAttribute("src", figure.src);
    img.setAttribute("alt", alt);
    img.setAttribute("width", String(figure.width));
    img.setAttribute("height", String(figure.height));
    img.setAttribute("loading", "lazy");
    return img;
  }

  // The same row as browsing.py's _image_row writes for readers without scripts.
  function imageRow(index) {
    const image = data.images[index];
    const row = element("tr");
    row.id = "image-" + index;
    const name = element("td", undefined, "name");
    const figures = element("td", undefined, "figure");
    if (image.figure) {
      const link = element("a", image.filename);
      link.setAttribute("href", image.figure.src);
      name.append(link);
      figures.append(picture(image.figure, image.filename));
    } else {
      name.textContent = image.filename;
      figures.append(element("span", "no figure", "meta"));
    }
    if (image.uncertainty) {
      figures.append(picture(image.uncertainty, image.filename + " uncertainty maps"));
    }
    row.append(name, element("td", formatted(image.miou)), element("td", formatted(image.pixel_accuracy)), figures);
    return row;
  }

  function drawImages() {
    const start = view.page * PAGE_SIZE;
    const rows = view.order.slice(start, start + PAGE_SIZE).map(imageRow);
    imageTable.tBodies[0].replaceChildren(...rows);
    range.textContent = rows.length
      ? (start + 1) + "\u2013" + (start + rows.length) + " of " + view.order.length
      : "no images";
    previous.disabled = view.page === 0;
    next.disabled = start + PAGE_SIZE >= view.order.length;
  }

  // A link to #image-N draws the page holding that row first; the browser then scrolls to it.
  function showPageOf(hash) {
    const match = /^#image-(\d+)$/.exec(hash);
    const position = match ? view.order.indexOf(Number(match[1])) : -1;
    if (position >= 0 && Math.floor(position / PAGE_SIZE) !== view.page) {
      view.page = Math.floor(position / PAGE_SIZE);
      drawImages();
    }
  }

  if (data) {
    imageTable.tHead.addEventListener("click", (event) => {
      const button = event.target.closest("button.sort");
      if (button) {
        view.direction = nextDirection(button);
        view.key = button.dataset.sort;
        view.page = 0;
        sortImages();
        drawImages();
        markSorted(imageTable.tHead, button, view.direction);
      }
    });
    previous.addEventListener("click", () => {
      view.page -= 1;
      drawImages();
    });
    next.addEventListener("click", () => {
      view.page += 1;
      drawImages();
    });
    document.addEventListener("click", (event) => {
      const link = event.target.closest("a[href^='#image-']");
      if (link) {
        showPageOf(link.getAttribute("href"));
      }
    });
    window.addEventListener("hashchange", () => showPageOf(location.hash));
    sortImages();
    drawImages();
    if (location.hash) {
      showPageOf(location.hash);
      document.getElementById(location.hash.slice(1))?.scrollIntoView();
    }
  }
})();
