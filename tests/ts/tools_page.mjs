// Opens the admin page in Debian's headless Chromium, signs in with the token, waits for
// the "Changed tools" section to list `count` tools, and prints JSON of what it shows:
// each card's name, badge and diff as text, the section's HTML, the elements an injected
// markup would have made, and whether any script an upstream sent ran (window.pwned).
import { chromium } from "playwright-core";

const [adminUrl, token, screenshot, count] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 60000);
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  await page.goto(adminUrl + "/");
  await page.fill("#token", token);
  await page.click("#loginform button");
  const cards = page.locator("[data-tool-change]");
  await cards.nth(Number(count) - 1).waitFor({ timeout: 30000 });
  const seen = { cards: [] };
  for (const card of await cards.all()) {
    seen.cards.push({
      status: await card.getAttribute("data-tool-change"),
      name: await card.locator(".tool").innerText(),
      badge: await card.locator(".badge").innerText(),
      meta: await card.locator(".meta").innerText(),
      diff: await card.locator("pre").innerText(),
    });
  }
  seen.count = await page.locator("#toolcount").innerText();
  seen.html = await page.locator("#toolsection").innerHTML();
  seen.injected = await page.locator("#toolsection img, #toolsection script, #toolsection b").count();
  seen.pwned = await page.evaluate(() => window.pwned ?? null);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(seen));
} finally {
  clearTimeout(timer);
  await browser.close();
}
