// Drives the approvals page in Debian's headless Chromium: sign in with the
// token, wait for the pending call to appear (no reload), click Approve, and
// save a screenshot. Prints JSON of what it saw.
import { chromium } from "playwright-core";

const [adminUrl, token, screenshot] = process.argv.slice(2);
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
  // Tell the test we are signed in and watching; the call is made after this line.
  console.error("READY");
  const card = page.locator("[data-approval]").first();
  await card.waitFor({ timeout: 30000 });
  const tool = await card.locator(".tool").innerText();
  const args = await card.locator("pre").innerText();
  await page.screenshot({ path: screenshot, fullPage: true });
  await card.locator("button[data-action=approve]").click();
  await page.locator(".badge.approved").first().waitFor({ timeout: 15000 });
  console.log(JSON.stringify({ tool, args, live: await page.locator("#statustext").innerText() }));
} finally {
  clearTimeout(timer);
  await browser.close();
}
