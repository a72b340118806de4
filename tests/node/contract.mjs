// An app that knows only the bundle's contract, not edgekd: the first input takes one RGB image as uint8
// [height, width, 3], the first output holds the class probabilities, preprocess.json lists the labels.
//   node contract.mjs MODEL.onnx PREPROCESS.json IMAGE.png...  ->  one JSON line per image: {file, label, probability}
import { readFileSync } from "node:fs";

import * as ort from "onnxruntime-node";
import pngjs from "pngjs";

const [model, preprocess, ...images] = process.argv.slice(2);
const labels = JSON.parse(readFileSync(preprocess, "utf8")).labels;
const session = await ort.InferenceSession.create(model);
for (const file of images) {
  const { width, height, data } = pngjs.PNG.sync.read(readFileSync(file));
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) rgb.set(data.subarray(4 * i, 4 * i + 3), 3 * i);
  const outputs = await session.run({ [session.inputNames[0]]: new ort.Tensor("uint8", rgb, [height, width, 3]) });
  const probabilities = outputs[session.outputNames[0]].data;
  let best = 0;
  for (let k = 1; k < probabilities.length; k++) if (probabilities[k] > probabilities[best]) best = k;
  console.log(JSON.stringify({ file, label: labels[best], probability: probabilities[best] }));
}
