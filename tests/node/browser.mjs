// Drive the bundle's web page in headless Chromium (playwright-core + Debian's chromium), as a user would: choose
// each image in the page's file input and read back the labels it shows; screenshot the page at the end.
//   node browser.mjs PAGE_URL SCREENSHOT.png IMAGE...  ->  one JSON line per image {file, label, probability,
//   width, height} (the decoded picture's size),
//   then {screenshot, image_width, labels}
import { basename } from "node:path";

import { chromium } from "playwright-core";

const [url, screenshot, ...images] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  // no sandbox as root; no background connections, which this machine's closed network refuses
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (error) => console.error(`page error: ${error.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.edgekdReady === true, null, { timeout: 120_000 });
  for (const file of images) {
    const name = basename(file);
    await page.setInputFiles("#file", file);
    await page.waitForFunction((n) => window.edgekdResult?.name === n, name, { timeout: 60_000 });
    const result = await page.evaluate(() => window.edgekdResult);
    console.log(JSON.stringify({ file, label: result.top[0][0], probability: result.top[0][1], width: result.width,
                                 height: result.height }));
  }
  await page.waitForFunction(() => document.getElementById("preview").naturalWidth > 0);
  await page.screenshot({ path: screenshot, fullPage: true });
  const shown = await page.evaluate(() => ({ image_width: document.getElementById("preview").naturalWidth,
                                             labels: document.querySelectorAll("#labels li").length }));
  console.log(JSON.stringify({ screenshot, ...shown }));
} finally {
  await browser.close();
}
