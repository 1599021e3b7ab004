// llama.cpp (prebuilt, through node-llama-cpp) on token ids: node llama.mjs MODEL.gguf REQUEST.json
//   {"mode": "greedy", "prompts": [[ids], ...], "max_new_tokens": N}
//       -> {"tokens": [[generated ids], ...]}: greedy decoding; the end token is not yielded (a finished answer is
//          its tokens before it)
//   {"mode": "score", "prompts": [[ids], ...], "continuations": [[ids], ...], "top": K}
//       -> {"top": [[[[id, p], ...K], ...one per continuation token], ...]}: teacher forcing, llama.cpp's K most
//          probable next tokens (temperature 1) before each continuation token
// Ids go in and come out, so a comparison with transformers does not depend on either tokenizer.
// One thread: with llama.cpp's default (every core) its workers spin against node's own thread, and on 2 cores
// 40 tokens of a 135M model took 128 s instead of 1.4 s.
import fs from "node:fs";
import {getLlama} from "node-llama-cpp";

const [modelPath, requestPath] = process.argv.slice(2);
const request = JSON.parse(fs.readFileSync(requestPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});

async function withSequence(length, fn) {
  const context = await model.createContext({contextSize: length + 8, sequences: 1, threads: 1});
  try {
    return await fn(context.getSequence());
  } finally {
    await context.dispose();
  }
}

async function greedy(prompt, maxNewTokens) {
  return withSequence(prompt.length + maxNewTokens, async (sequence) => {
    const generated = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
      generated.push(token);
      if (generated.length >= maxNewTokens || model.isEogToken(token)) break;
    }
    return generated;
  });
}

async function score(prompt, continuation, top) {
  const tokens = [...prompt, ...continuation];
  return withSequence(tokens.length, async (sequence) => {
    const asked = (i) => i >= prompt.length - 1 && i < tokens.length - 1;
    // the full distribution: without topK 0 / topP 1 / minP 0 the probabilities come renormalised after truncation
    const options = {temperature: 1, topK: 0, topP: 1, minP: 0};
    const input = tokens.map((t, i) => asked(i) ? [t, {generateNext: {probabilities: true, options}}] : t);
    const output = await sequence.controlledEvaluate(input);
    const rows = [];
    for (let i = prompt.length - 1; i < tokens.length - 1; i++) {
      const ranked = [...output[i].next.probabilities.entries()].sort((a, b) => b[1] - a[1]);
      rows.push(ranked.slice(0, top));
    }
    return rows;
  });
}

const result = {};
if ((request.mode ?? "greedy") === "greedy") {
  result.tokens = [];
  for (const prompt of request.prompts) result.tokens.push(await greedy(prompt, request.max_new_tokens));
} else {
  result.top = [];
  for (let i = 0; i < request.prompts.length; i++) {
    result.top.push(await score(request.prompts[i], request.continuations[i], request.top ?? 5));
  }
}
console.log(JSON.stringify(result));
await model.dispose();
await llama.dispose();
