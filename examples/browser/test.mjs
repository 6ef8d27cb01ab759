// The browser example in headless Chromium (Debian's, driven by playwright-core):
//   node test.mjs <gateway ws url> <token a> <token b>
// Two pages open the same document through the gateway and each adds an item; both
// must show both. The script then prints {"doc": <automerge url>} and waits for a line
// on stdin: the caller (gateway/tests/browser.rs) has added "from native" with the Rust
// SDK, which both pages must then show. Prints the final lists.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const [gateway, tokenA, tokenB] = process.argv.slice(2);
const root = path.dirname(new URL(import.meta.url).pathname);
const types = { ".html": "text/html", ".js": "text/javascript" };
const server = http.createServer((req, res) => {
  const file = new URL(req.url, "http://x").pathname.replace(/^\/$/, "/index.html");
  const full = path.join(root, path.normalize(file));
  if (!full.startsWith(root) || !fs.existsSync(full)) { res.writeHead(404); res.end(); return; }
  res.writeHead(200, { "content-type": types[path.extname(full)] ?? "application/octet-stream" });
  fs.createReadStream(full).pipe(res);
});
await new Promise(resolve => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}/index.html`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const fail = async error => {
  console.error(error?.stack ?? String(error));
  await browser.close();
  process.exit(1);
};
try {
  const items = page => page.$$eval("#items li", lis => lis.map(li => li.textContent));
  const until = async (page, wanted) => {
    await page.waitForFunction(
      wanted => wanted.every(w => [...document.querySelectorAll("#items li")].some(li => li.textContent === w)),
      wanted, { timeout: 60000 });
  };
  const open = async (token, hash = "") => {
    const page = await browser.newPage();
    page.on("pageerror", error => console.error("page error:", error.message));
    const query = `?gateway=${encodeURIComponent(gateway)}&token=${encodeURIComponent(token)}`;
    await page.goto(`${base}${query}${hash}`);
    await page.waitForFunction(() => window.meridian?.handle, null, { timeout: 60000 });
    return page;
  };
  const add = async (page, text) => {
    await page.fill("#item", text);
    await page.click("#add button");
  };
  const a = await open(tokenA);
  const doc = await a.evaluate(() => window.meridian.handle.url);
  const b = await open(tokenB, `#${doc}`);
  await add(a, "from page a");
  await add(b, "from page b");
  await until(a, ["from page a", "from page b"]);
  await until(b, ["from page a", "from page b"]);
  console.log(JSON.stringify({ doc }));
  const lines = readline.createInterface({ input: process.stdin });
  await new Promise(resolve => lines.once("line", resolve));
  await until(a, ["from native"]);
  await until(b, ["from native"]);
  console.log(JSON.stringify({ a: await items(a), b: await items(b) }));
  await browser.close();
  server.close();
  process.exit(0);
} catch (error) { await fail(error); }
