"""Module-level import edges of a crate's src/, and the cycles among them.

Usage: module_cycles.py CRATE_DIR [DEPTH] [-v]

Every `crate::a::b` or `super::…` path in a module's code (tests excluded)
is resolved to the longest module it names, then cut to DEPTH segments
(1: top-level modules). An edge between a module and its own parent or
child does not count. Prints the number of edges and the strongly
connected components larger than one module ("cycles: none" when there are
none), and with -v every edge. It reads paths, not types, so a doc link
counts as an import: keep those pointing down the graph too.
"""
import os,re,sys
root=sys.argv[1]
src=os.path.join(root,"src")
def modname(path):
    rel=os.path.relpath(path,src)[:-3]
    parts=rel.split(os.sep)
    if parts[-1] in("mod","lib","main"): parts=parts[:-1]
    return "::".join(parts)
mods={}
for dp,_,fs in os.walk(src):
    for f in fs:
        if f.endswith(".rs"): mods[modname(os.path.join(dp,f))]=os.path.join(dp,f)
edges=set()
depth=int(sys.argv[2]) if len(sys.argv)>2 else 2
def trunc(m): return "::".join(m.split("::")[:depth])
for m,p in mods.items():
    text=open(p).read()
    text=re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*","",text,flags=re.S)
    for u in re.findall(r"(?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+",text):
        segs=u.split("::")
        if segs[0]=="crate": target=segs[1:]
        else:
            base=m.split("::") if m else []
            if not os.path.basename(p) in("mod.rs",): base=base[:-1]
            i=0
            while i<len(segs) and segs[i]=="super":
                if i>0: base=base[:-1]
                i+=1
            target=base+segs[i:]
        # longest prefix that is a module
        t=None
        for k in range(len(target),0,-1):
            c="::".join(target[:k])
            if c in mods: t=c;break
        if t is None: continue
        a,b=trunc(m),trunc(t)
        if a!=b and not b.startswith(a+"::") and not a.startswith(b+"::"): edges.add((a,b))
g={}
for a,b in edges: g.setdefault(a,set()).add(b)
# strongly connected components (Tarjan)
idx={};low={};st=[];on=set();out=[];n=[0]
def sc(v):
    idx[v]=low[v]=n[0];n[0]+=1;st.append(v);on.add(v)
    for w in g.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: out.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in list(g):
    if v not in idx: sc(v)
print(f"{len(edges)} module edges; cycles: {out if out else 'none'}")
if "-v" in sys.argv:
    for a in sorted(g): print(f"  {a} -> {', '.join(sorted(g[a]))}")
