// Opens the admin page in Debian's headless Chromium, signs in with the token, waits for
// the tool lock's section to list the changed tool named by the third argument, saves a
// screenshot, and prints JSON of what it saw: each changed tool's name, status and diff as
// shown, the page's title and the number of <img> and <script> elements in the section
// (markup in a description must show as text, never run).
import { chromium } from "playwright-core";

const [adminUrl, token, tool, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 60000);
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const dialogs = [];
  page.on("dialog", d => { dialogs.push(d.message()); d.dismiss(); });
  await page.goto(adminUrl + "/");
  await page.fill("#token", token);
  await page.click("#loginform button");
  await page.locator(`[data-changed-tool="${tool}"]`).waitFor({ timeout: 30000 });
  const cards = page.locator("[data-changed-tool]");
  const seen = { tools: [] };
  for (let i = 0; i < await cards.count(); i++) {
    const card = cards.nth(i);
    seen.tools.push({
      name: await card.getAttribute("data-changed-tool"),
      server: await card.getAttribute("data-server"),
      shown: await card.locator(".tool").innerText(),
      badge: await card.locator(".badge").innerText(),
      diff: await card.locator("pre").innerText(),
    });
  }
  seen.count = await page.locator("#toolcount").innerText();
  seen.title = await page.title();
  seen.img = await page.locator("#toolsection img").count();
  seen.script = await page.locator("#toolsection script").count();
  seen.dialogs = dialogs;
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(seen));
} finally {
  clearTimeout(timer);
  await browser.close();
}
