// node converge.mjs <url a> <url b> <automerge url>: two peers edit the same document
// (a native client edits it too) and wait until both hold every edit: keys a, b, and
// `native` (which the test's Rust client sets after it sees a and b). Prints the result.
import { connect, until, done, fail } from "./lib.mjs";
const [urlA, urlB, docUrl] = process.argv.slice(2);
try {
  const a = connect(urlA);
  const b = connect(urlB);
  const [ha, hb] = await Promise.all([a.find(docUrl), b.find(docUrl)]);
  ha.change(d => { d.a = "from peer a"; });
  hb.change(d => { d.b = "from peer b"; });
  const all = h => ["a", "b", "native"].every(k => h.doc()[k] !== undefined);
  await until("both peers to converge", () => all(ha) && all(hb), 60000);
  await until("equal heads", () => JSON.stringify(ha.heads().sort()) === JSON.stringify(hb.heads().sort()));
  done(a, { a: ha.doc(), b: hb.doc() });
} catch (error) { fail(error); }
