// The chat page at `/`: the chat on this origin, a gateway key asked for when needed.
import { mountChat } from "./chat.js";

window.unbrokenChat = mountChat(document.getElementById("chat"), { base: "", mode: "page" });
