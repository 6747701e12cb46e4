// A small DeepZoom viewer on one canvas: drag to pan, wheel or double-click to zoom,
// boxes in level-0 pixels drawn over the tiles. Tiles come through `fetchTile` (so they
// carry the bearer token) and are kept as bitmaps; while a tile loads, the coarser levels
// already loaded are drawn under it.

const MAX_TILES = 800; // bitmaps kept (256 px each: about 200 MB of decoded pixels at most)
const MAX_LOADING = 8; // tile requests in flight
const COARSER_LEVELS = 4; // fallback levels drawn under a missing tile
const MAX_ZOOM = 4; // screen pixels per level-0 pixel at the closest

export class Viewer {
  constructor(container, info, fetchTile) {
    this.info = info;
    this.fetchTile = fetchTile;
    this.top = info.levels - 1; // the DeepZoom level at the slide's full resolution
    this.tiles = new Map(); // "level/col/row" -> {bitmap, used} (bitmap null while loading)
    this.queue = [];
    this.loading = 0;
    this.boxes = []; // {id, x, y, w, h, colour, rank}
    this.selected = null;
    this.onViewChange = () => {};
    this.container = container;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "viewer-canvas";
    container.append(this.canvas);
    this.ctx = this.canvas.getContext("2d");
    this.center = { x: info.width / 2, y: info.height / 2 };
    this.scale = 1; // device pixels per level-0 pixel
    this.frame = 0;
    this.listen();
    new ResizeObserver(() => this.resize()).observe(container);
    this.resize();
    this.home();
  }

  // --- the view --------------------------------------------------------------------------

  resize() {
    const { width, height } = this.container.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.max(1, Math.round(width * dpr));
    this.canvas.height = Math.max(1, Math.round(height * dpr));
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    this.redraw();
  }

  get minScale() {
    return 0.9 * Math.min(this.canvas.width / this.info.width, this.canvas.height / this.info.height);
  }

  home() {
    this.setView(this.info.width / 2, this.info.height / 2, this.minScale);
  }

  // The visible rectangle in level-0 pixels.
  get view() {
    const w = this.canvas.width / this.scale;
    const h = this.canvas.height / this.scale;
    return { x: this.center.x - w / 2, y: this.center.y - h / 2, w, h };
  }

  setView(x, y, scale) {
    this.scale = Math.min(Math.max(scale, this.minScale), MAX_ZOOM * (window.devicePixelRatio || 1));
    this.center = {
      x: Math.min(Math.max(x, 0), this.info.width),
      y: Math.min(Math.max(y, 0), this.info.height),
    };
    this.redraw();
    this.onViewChange(this.view, this.scale / (window.devicePixelRatio || 1));
  }

  zoomAt(factor, px, py) {
    const before = this.toSlide(px, py);
    const scale = Math.min(Math.max(this.scale * factor, this.minScale), MAX_ZOOM * (window.devicePixelRatio || 1));
    // Keep the slide point under the pointer where it is.
    const x = before.x - (px - this.canvas.width / 2) / scale;
    const y = before.y - (py - this.canvas.height / 2) / scale;
    this.setView(x, y, scale);
  }

  toSlide(px, py) {
    const v = this.view;
    return { x: v.x + px / this.scale, y: v.y + py / this.scale };
  }

  // Pan and zoom to a box (level-0 px) so it fills about an eighth of the view, in 400 ms.
  flyTo(box) {
    const side = Math.max(box.w, box.h, 16) * 8;
    const target = {
      x: box.x + box.w / 2,
      y: box.y + box.h / 2,
      scale: Math.min(this.canvas.width, this.canvas.height) / side,
    };
    const start = { ...this.center, scale: this.scale };
    const began = performance.now();
    const step = (now) => {
      const t = Math.min(1, (now - began) / 400);
      const e = t * t * (3 - 2 * t);
      const scale = Math.exp(Math.log(start.scale) * (1 - e) + Math.log(target.scale) * e);
      this.setView(start.x + (target.x - start.x) * e, start.y + (target.y - start.y) * e, scale);
      if (t < 1) requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
  }

  setBoxes(boxes) {
    this.boxes = boxes;
    this.redraw();
  }

  select(id) {
    this.selected = id;
    this.redraw();
  }

  listen() {
    const c = this.canvas;
    const dpr = () => window.devicePixelRatio || 1;
    let drag = null;
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, center: { ...this.center } };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = ((e.clientX - drag.x) * dpr()) / this.scale;
      const dy = ((e.clientY - drag.y) * dpr()) / this.scale;
      this.setView(drag.center.x - dx, drag.center.y - dy, this.scale);
    });
    c.addEventListener("pointerup", () => { drag = null; });
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = c.getBoundingClientRect();
      this.zoomAt(Math.exp(-e.deltaY / 300), (e.clientX - r.left) * dpr(), (e.clientY - r.top) * dpr());
    }, { passive: false });
    c.addEventListener("dblclick", (e) => {
      const r = c.getBoundingClientRect();
      this.zoomAt(e.shiftKey ? 0.5 : 2, (e.clientX - r.left) * dpr(), (e.clientY - r.top) * dpr());
    });
  }

  // --- drawing -----------------------------------------------------------------------------

  redraw() {
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }

  // The DeepZoom level whose pixels are at least as fine as the screen's, and its
  // downsample from level 0.
  level() {
    const down = 2 ** Math.max(0, Math.floor(Math.log2(1 / this.scale)));
    const level = Math.max(0, this.top - Math.log2(down));
    return { level, down: 2 ** (this.top - level) };
  }

  draw() {
    const { ctx, canvas } = this;
    ctx.fillStyle = "#e9e9ec";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const { level } = this.level();
    let drawn = 0;
    for (let l = Math.max(0, level - COARSER_LEVELS); l <= level; l++) drawn += this.drawLevel(l, l === level);
    this.pump();
    this.drawBoxes();
    Object.assign(canvas.dataset, { level, tilesDrawn: drawn });
  }

  // Draw the loaded tiles of `level` over the view; `want` queues the missing ones.
  drawLevel(level, want) {
    const { tile_size: size, overlap } = this.info;
    const down = 2 ** (this.top - level);
    const v = this.view;
    const cols = Math.ceil(Math.ceil(this.info.width / down) / size);
    const rows = Math.ceil(Math.ceil(this.info.height / down) / size);
    const c0 = Math.max(0, Math.floor(v.x / down / size));
    const c1 = Math.min(cols - 1, Math.floor((v.x + v.w) / down / size));
    const r0 = Math.max(0, Math.floor(v.y / down / size));
    const r1 = Math.min(rows - 1, Math.floor((v.y + v.h) / down / size));
    const missing = [];
    let drawn = 0;
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const key = `${level}/${c}/${r}`;
        const tile = this.tiles.get(key);
        if (tile?.bitmap) {
          tile.used = performance.now();
          // The tile without its overlap, drawn edge to edge on whole device pixels, so
          // neighbours meet without seams.
          const sx = c ? overlap : 0;
          const sy = r ? overlap : 0;
          const sw = Math.min(size, tile.bitmap.width - sx);
          const sh = Math.min(size, tile.bitmap.height - sy);
          const x0 = Math.round((c * size * down - v.x) * this.scale);
          const y0 = Math.round((r * size * down - v.y) * this.scale);
          const x1 = Math.round(((c * size + sw) * down - v.x) * this.scale);
          const y1 = Math.round(((r * size + sh) * down - v.y) * this.scale);
          this.ctx.drawImage(tile.bitmap, sx, sy, sw, sh, x0, y0, x1 - x0, y1 - y0);
          drawn++;
        } else if (want && !tile) {
          missing.push({ key, level, c, r, d: Math.hypot(c - (c0 + c1) / 2, r - (r0 + r1) / 2) });
        }
      }
    }
    if (want) this.queue = missing.sort((a, b) => a.d - b.d); // nearest the centre first
    return drawn;
  }

  pump() {
    while (this.loading < MAX_LOADING && this.queue.length) {
      const { key, level, c, r } = this.queue.shift();
      if (this.tiles.has(key)) continue;
      const entry = { bitmap: null, used: performance.now() };
      this.tiles.set(key, entry);
      this.loading++;
      this.fetchTile(level, c, r)
        .then((bitmap) => { entry.bitmap = bitmap; })
        .catch(() => this.tiles.delete(key))
        .finally(() => {
          this.loading--;
          this.evict();
          this.redraw();
        });
    }
  }

  evict() {
    if (this.tiles.size <= MAX_TILES) return;
    const loaded = [...this.tiles].filter(([, t]) => t.bitmap).sort((a, b) => a[1].used - b[1].used);
    for (const [key, tile] of loaded.slice(0, this.tiles.size - MAX_TILES)) {
      tile.bitmap.close?.();
      this.tiles.delete(key);
    }
  }

  drawBoxes() {
    const { ctx } = this;
    const v = this.view;
    const dpr = window.devicePixelRatio || 1;
    let drawn = 0;
    let chosen = null;
    for (const box of this.boxes) {
      if (box.x > v.x + v.w || box.y > v.y + v.h || box.x + box.w < v.x || box.y + box.h < v.y) continue;
      const x = (box.x - v.x) * this.scale;
      const y = (box.y - v.y) * this.scale;
      const w = Math.max(box.w * this.scale, 3 * dpr);
      const h = Math.max(box.h * this.scale, 3 * dpr);
      ctx.lineWidth = (box.rank ? 2.5 : 1.5) * dpr;
      ctx.strokeStyle = box.colour;
      ctx.strokeRect(x, y, w, h);
      if (box.rank && this.scale * box.w > 12) {
        ctx.fillStyle = box.colour;
        ctx.font = `${11 * dpr}px system-ui, sans-serif`;
        ctx.fillText(String(box.rank), x, y - 3 * dpr);
      }
      if (box.id === this.selected) chosen = { x, y, w, h };
      drawn++;
    }
    if (chosen) {
      const pad = 6 * dpr;
      ctx.lineWidth = 3 * dpr;
      ctx.strokeStyle = "#1f6feb";
      ctx.setLineDash([6 * dpr, 4 * dpr]);
      ctx.strokeRect(chosen.x - pad, chosen.y - pad, chosen.w + 2 * pad, chosen.h + 2 * pad);
      ctx.setLineDash([]);
    }
    this.canvas.dataset.boxesDrawn = drawn;
  }
}
