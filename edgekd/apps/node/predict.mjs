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

// PNG or JPEG bytes -> { width, height, rgb } with rgb a Uint8Array of height * width * 3 (alpha dropped, as
// Pillow's convert("RGB") does in the Python runtime).
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
    rgb[3 * i] = pixels[j];
    rgb[3 * i + 1] = pixels[j + 1];
    rgb[3 * i + 2] = pixels[j + 2];
  }
  return { width, height, rgb };
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
