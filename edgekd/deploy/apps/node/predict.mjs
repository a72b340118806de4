#!/usr/bin/env node
// Classify images with this edgekd bundle in Node.js:
//
//   npm install            (onnxruntime-node, and jpeg-js + pngjs to decode images; see package.json)
//   node predict.mjs photo.jpg other.png [--top-k 5]
//
// Prints one JSON line per image: {"file": ..., "top": [[label, probability], ...]}. Or, from your own code:
//
//   import { loadBundle, classify } from "./predict.mjs";
//   const bundle = await loadBundle();                 // this folder
//   const top = await classify(bundle, imageBytes, 3); // [[label, probability], ...]
//
// The model is model_with_preprocessing.onnx: it takes the decoded RGB pixels as uint8 [height, width, 3] and
// returns probabilities; resizing, cropping and normalisation happen inside it, exactly as edgekd validated them.

import { realpathSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import jpeg from "jpeg-js";
import * as ort from "onnxruntime-node";
import pngjs from "pngjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const MODEL = "model_with_preprocessing.onnx";

export async function loadBundle(folder = HERE) {
  const config = JSON.parse(await readFile(join(folder, "preprocess.json"), "utf8"));
  const session = await ort.InferenceSession.create(join(folder, MODEL));
  return { config, session, labels: config.labels };
}

// PNG or JPEG bytes -> { width, height, rgb } with rgb a Uint8Array of height * width * 3, the picture as a viewer
// shows it and as edgekd.runtime.as_model_pixels gives it to the Python runtime: a JPEG turned upright by its EXIF
// orientation, transparency composited onto white in the same integer arithmetic.
export function decode(bytes) {
  const isPng = bytes.length > 8 && bytes[0] === 0x89 && bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47;
  const isJpeg = bytes.length > 3 && bytes[0] === 0xff && bytes[1] === 0xd8;
  let width, height, pixels, channels;
  if (isPng) {
    ({ width, height, data: pixels } = pngjs.PNG.sync.read(Buffer.from(bytes))); // 8-bit RGBA, whatever the PNG type
    channels = 4;
  } else if (isJpeg) {
    ({ width, height, data: pixels } = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: false }));
    channels = 3;
  } else {
    throw new Error("not a PNG or JPEG image");
  }
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < width * height; i++, j += channels) {
    const alpha = channels === 4 ? pixels[j + 3] : 255;
    for (let c = 0; c < 3; c++) {
      rgb[3 * i + c] = Math.floor((pixels[j + c] * alpha + 255 * (255 - alpha) + 127) / 255);
    }
  }
  return isJpeg ? upright({ width, height, rgb }, exifOrientation(bytes)) : { width, height, rgb };
}

// The EXIF orientation tag (1-8) of a JPEG, 1 when it has none: APP1 "Exif", TIFF header, first IFD, tag 0x0112.
export function exifOrientation(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let at = 2; at + 4 <= bytes.length && bytes[at] === 0xff;) {
    const marker = bytes[at + 1], length = view.getUint16(at + 2);
    if (marker === 0xda) break; // start of scan: no metadata after it
    const tiff = at + 10;
    if (marker === 0xe1 && view.getUint32(at + 4) === 0x45786966 && tiff + 8 <= bytes.length) { // "Exif"
      const little = view.getUint16(tiff) === 0x4949; // "II"
      const ifd = tiff + view.getUint32(tiff + 4, little);
      const entries = ifd + 2 <= bytes.length ? view.getUint16(ifd, little) : 0;
      for (let e = 0; e < entries && ifd + 14 + 12 * e <= bytes.length; e++) {
        const entry = ifd + 2 + 12 * e;
        if (view.getUint16(entry, little) === 0x0112) {
          const value = view.getUint16(entry + 8, little);
          return value >= 1 && value <= 8 ? value : 1;
        }
      }
      return 1;
    }
    at += 2 + length;
  }
  return 1;
}

// Turn decoded pixels by an EXIF orientation, as Pillow's ImageOps.exif_transpose does. Orientations 5-8 swap the
// sides; for each output pixel (x, y), `source` says which input pixel it shows.
export function upright({ width, height, rgb }, orientation) {
  if (orientation === 1) return { width, height, rgb };
  const w = width, h = height;
  const source = {
    2: (x, y) => [w - 1 - x, y], 3: (x, y) => [w - 1 - x, h - 1 - y], 4: (x, y) => [x, h - 1 - y],
    5: (x, y) => [y, x], 6: (x, y) => [y, h - 1 - x], 7: (x, y) => [w - 1 - y, h - 1 - x], 8: (x, y) => [w - 1 - y, x],
  }[orientation];
  const [outW, outH] = orientation >= 5 ? [h, w] : [w, h];
  const out = new Uint8Array(rgb.length);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const [sx, sy] = source(x, y);
      const from = 3 * (sy * w + sx), to = 3 * (y * outW + x);
      out[to] = rgb[from]; out[to + 1] = rgb[from + 1]; out[to + 2] = rgb[from + 2];
    }
  }
  return { width: outW, height: outH, rgb: out };
}

// The `topK` most likely labels with their probabilities, most likely first.
export async function classify(bundle, bytes, topK = 5) {
  const { width, height, rgb } = decode(bytes);
  const input = new ort.Tensor("uint8", rgb, [height, width, 3]);
  const outputs = await bundle.session.run({ [bundle.session.inputNames[0]]: input });
  const probabilities = Array.from(outputs[bundle.session.outputNames[0]].data);
  return probabilities
    .map((probability, index) => [bundle.labels[index] ?? String(index), probability])
    .sort((a, b) => b[1] - a[1])
    .slice(0, Math.max(1, topK));
}

async function main(argv) {
  const files = [];
  let topK = 5;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--top-k") topK = Number(argv[++i]);
    else files.push(argv[i]);
  }
  if (files.length === 0 || !Number.isInteger(topK) || topK < 1) {
    console.error("usage: node predict.mjs IMAGE... [--top-k N]");
    process.exit(2);
  }
  const bundle = await loadBundle();
  let failed = false;
  for (const file of files) {
    try {
      console.log(JSON.stringify({ file, top: await classify(bundle, await readFile(file), topK) }));
    } catch (error) {
      console.error(`${file}: ${error.message}`);
      failed = true;
    }
  }
  process.exit(failed ? 1 : 0);
}

// Run as a script (not imported): compare real paths, as a symlinked folder gives two names for this file.
if (process.argv[1] && fileURLToPath(import.meta.url) === realpathSync(process.argv[1])) {
  await main(process.argv.slice(2));
}
