// The drawing pad (Pointer Events: mouse, pen and touch) and the 8x8 input the models see.
//
// The digits data set was made from 32x32 bitmaps of size-normalised digits, counted in
// non-overlapping 4x4 blocks: each of the 8x8 values is 0..16, divided by 16 for the models
// (ink = 1). The pad does the same: crop to the ink, scale the square around it to 32x32,
// threshold, count each 4x4 block.

const GRID = 8;
const BITMAP = 32;
const BLOCK = BITMAP / GRID;

export class Pad {
  /** `onInput(pixels, drawing)`: 64 values in [0, 1], or null for an empty pad; once per
   * frame while a stroke goes on (`drawing` true), and once more when it ends (false). */
  constructor(canvas, onInput) {
    this.canvas = canvas;
    this.onInput = onInput;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.bitmap = document.createElement("canvas");
    this.bitmap.width = this.bitmap.height = BITMAP;
    this.last = null;
    this.frame = 0;
    this.showingSample = false;
    canvas.addEventListener("pointerdown", (e) => this.#down(e));
    canvas.addEventListener("pointermove", (e) => this.#move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(type, () => {
        if (!this.last) return;
        this.last = null;
        this.onInput(this.read(), false);
      });
    }
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.showingSample = false;
    this.last = null;
  }

  /** Paints a sample's 64 intensities as blocks; the next stroke starts a fresh drawing. */
  showSample(pixels) {
    this.clear();
    const cell = this.canvas.width / GRID;
    pixels.forEach((v, i) => {
      if (v <= 0) return;
      this.ctx.fillStyle = `rgba(17, 17, 17, ${v})`;
      this.ctx.fillRect((i % GRID) * cell, Math.floor(i / GRID) * cell, cell, cell);
    });
    this.showingSample = true;
  }

  #point(e) {
    const box = this.canvas.getBoundingClientRect();
    return [
      ((e.clientX - box.left) * this.canvas.width) / box.width,
      ((e.clientY - box.top) * this.canvas.height) / box.height,
    ];
  }

  #down(e) {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    e.preventDefault();
    if (this.showingSample) this.clear();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.#point(e);
    this.#stroke([this.last]);
  }

  #move(e) {
    if (!this.last) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    this.#stroke(events.map((event) => this.#point(event)));
  }

  #stroke(points) {
    const { ctx } = this;
    ctx.strokeStyle = "#111";
    // About the stroke width of the data set's digits once scaled to 32x32.
    ctx.lineWidth = this.canvas.width / 10;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...this.last);
    for (const p of points) ctx.lineTo(...p);
    if (points.length === 1) ctx.lineTo(points[0][0] + 0.1, points[0][1]); // a dot
    ctx.stroke();
    this.last = points[points.length - 1];
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.onInput(this.read(), this.last !== null);
      });
    }
  }

  /** The drawing as 64 intensities in [0, 1] (row-major), or null when nothing is drawn. */
  read() {
    const { width, height } = this.canvas;
    const rgba = this.ctx.getImageData(0, 0, width, height).data;
    let top = height;
    let left = width;
    let bottom = -1;
    let right = -1;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (rgba[(y * width + x) * 4 + 3] > 0) {
          top = Math.min(top, y);
          bottom = Math.max(bottom, y);
          left = Math.min(left, x);
          right = Math.max(right, x);
        }
      }
    }
    if (bottom < 0) return null;
    // A square around the ink keeps the digit's proportions (a "1" stays thin).
    const side = Math.max(right - left, bottom - top) + 1;
    const x0 = (left + right + 1 - side) / 2;
    const y0 = (top + bottom + 1 - side) / 2;
    const bitmap = this.bitmap.getContext("2d", { willReadFrequently: true });
    bitmap.clearRect(0, 0, BITMAP, BITMAP);
    bitmap.drawImage(this.canvas, x0, y0, side, side, 0, 0, BITMAP, BITMAP);
    const bits = bitmap.getImageData(0, 0, BITMAP, BITMAP).data;
    const pixels = new Array(GRID * GRID).fill(0);
    for (let y = 0; y < BITMAP; y++) {
      for (let x = 0; x < BITMAP; x++) {
        if (bits[(y * BITMAP + x) * 4 + 3] >= 128) {
          pixels[Math.floor(y / BLOCK) * GRID + Math.floor(x / BLOCK)] += 1 / (BLOCK * BLOCK);
        }
      }
    }
    return pixels;
  }
}

/** Shows 64 intensities on the 8x8 preview canvas (ink dark, as on the pad). */
export function drawPreview(canvas, pixels) {
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(GRID, GRID);
  for (let i = 0; i < GRID * GRID; i++) {
    const grey = Math.round(255 - 238 * (pixels ? pixels[i] : 0));
    image.data.set([grey, grey, grey, 255], i * 4);
  }
  ctx.putImageData(image, 0, 0);
}
