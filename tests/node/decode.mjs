// The pixels predict.mjs hands the model, for comparison with Python's: node decode.mjs IMAGE...  ->  one JSON line
// per image {file, width, height, rgb} with rgb the [height, width, 3] bytes in base64.
import { readFile } from "node:fs/promises";

import { decode } from "./predict.mjs";

for (const file of process.argv.slice(2)) {
  const { width, height, rgb } = decode(new Uint8Array(await readFile(file)));
  console.log(JSON.stringify({ file, width, height, rgb: Buffer.from(rgb).toString("base64") }));
}
