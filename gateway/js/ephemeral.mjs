// node ephemeral.mjs <url> <automerge url>: broadcasts {cursor: 7} on the document until
// it hears an ephemeral message from another peer (a native client's presence); prints
// that message and who sent it.
import { connect, done, fail } from "./lib.mjs";
const [url, docUrl] = process.argv.slice(2);
try {
  const repo = connect(url);
  const handle = await repo.find(docUrl);
  const heard = new Promise(resolve => handle.on("ephemeral-message", resolve));
  const timer = setInterval(() => handle.broadcast({ cursor: 7 }), 100);
  const message = await Promise.race([
    heard,
    new Promise((_, reject) => setTimeout(() => reject(new Error("no ephemeral message")), 30000)),
  ]);
  clearInterval(timer);
  done(repo, { senderId: message.senderId, message: message.message });
} catch (error) { fail(error); }
