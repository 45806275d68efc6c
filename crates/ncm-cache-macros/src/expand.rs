//! Code generation: the annotated `async fn` keeps its signature; its body becomes a lazy
//! future handed to `ncm_cache_loader::__private::cached`, which reads the cache, runs the
//! body on a miss (once per key across concurrent callers) and stores the result.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ImplItemFn, Pat, ReturnType, Signature, Type};

use crate::options::Options;

/// Which macro is expanding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `#[cache_loader]`: a function without `self`.
    Function,
    /// `#[cache_method]`: a method taking `self`.
    Method,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Function => "cache_loader",
            Self::Method => "cache_method",
        }
    }
}

/// Expands one annotated function.
pub(crate) fn expand(kind: Kind, attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    // `ImplItemFn` parses free functions and methods alike (a body is required).
    let func: ImplItemFn = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            format!(
                "#[{}] applies to an `async fn` with a body: {e}",
                kind.name()
            ),
        )
    })?;
    let opts = Options::parse(attr, kind.name())?;
    let sig = &func.sig;
    let name = kind.name();

    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            format!(
                "#[{name}] needs an `async fn`: the cache is read and filled asynchronously \
                 (write `async fn {}`)",
                sig.ident
            ),
        ));
    }
    match (kind, sig.receiver()) {
        (Kind::Function, Some(receiver)) => {
            return Err(syn::Error::new(
                receiver.self_token.span,
                "#[cache_loader] is for functions without `self`; use #[cache_method] on \
                 methods (the `self` argument is left out of the cache key)",
            ));
        }
        (Kind::Method, None) => {
            return Err(syn::Error::new(
                sig.ident.span(),
                "#[cache_method] is for methods taking `self` (`&self`, `&mut self`, `self`); \
                 use #[cache_loader] on functions without a receiver",
            ));
        }
        _ => {}
    }
    let mode = output_mode(sig, &opts, name)?;
    reject_unkeyed_generics(sig, &opts, name)?;

    // The key: a custom expression, or every non-`self` argument in order.
    let key = match &opts.key {
        Some(expr) => quote_spanned! {expr.span()=>
            ::ncm_cache_loader::__private::custom_key(&(#expr))
        },
        None => {
            let mut args = Vec::new();
            for input in &sig.inputs {
                let FnArg::Typed(pt) = input else { continue };
                match &*pt.pat {
                    Pat::Ident(p) if p.subpat.is_none() => {
                        let ident = &p.ident;
                        // A hash-ordered set is keyed sorted: its iteration order differs
                        // between processes (and between two sets of the same elements).
                        args.push(match hash_set(&pt.ty) {
                            Some(true) => quote_spanned!(pt.span()=>
                                &::ncm_cache_loader::__private::Unordered(#ident)),
                            Some(false) => quote_spanned!(pt.span()=>
                                &::ncm_cache_loader::__private::Unordered(&#ident)),
                            None => quote_spanned!(pt.span()=> &#ident),
                        });
                    }
                    other => {
                        return Err(syn::Error::new(
                            other.span(),
                            format!(
                                "#[{name}] builds the cache key from the arguments, so each \
                                 needs a plain name: bind this pattern to a name, or give a \
                                 `key = ...` expression"
                            ),
                        ));
                    }
                }
            }
            quote!(::ncm_cache_loader::__private::args_key(&(#(#args,)*)))
        }
    };

    let loader = opts.loader.as_ref().map(|l| {
        // Method-call syntax auto-dereferences: a `CacheLoader`, a reference, an `Arc`, a
        // `LazyLock` static or a field all work. The handle is a cheap clone (one `Arc`), so no
        // borrow of `self` outlives this line.
        quote_spanned!(l.span()=> (#l).__ncm_cache_loader())
    });
    // The loader name (the key's middle part): `module::fn` or `module::Type::method`, from
    // the source as written — never from the compiler's `type_name` of the fn, whose format may
    // change between toolchains.
    let ident = &sig.ident;
    // The compiler's path of the function (from a marker fn declared in its body) only tells
    // where it sits when that is not `module::fn`: in an impl, a trait impl or another fn.
    let fn_name = match (&opts.name, kind) {
        (Some(lit), _) => quote!(#lit),
        (None, Kind::Function) => quote!(::ncm_cache_loader::__private::fn_name(
            ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
            ::core::any::type_name_of_val(&__ncm_cache_fn),
        )),
        (None, Kind::Method) => quote!(::ncm_cache_loader::__private::method_name(
            ::core::module_path!(),
            ::core::any::type_name::<Self>(),
            ::core::stringify!(#ident),
            ::core::any::type_name_of_val(&__ncm_cache_fn),
        )),
    };
    let ttl = &opts.ttl;
    let strategy = &opts.strategy;
    let block = &func.block;
    let attrs = &func.attrs;
    let vis = &func.vis;
    let defaultness = &func.defaultness;

    // Internal locals use mixed-site hygiene so the body cannot see (or shadow) them.
    let site = Span::mixed_site();
    let v_name = syn::Ident::new("__ncm_name", site);
    let v_loader = syn::Ident::new("__ncm_loader", site);
    let v_key = syn::Ident::new("__ncm_key", site);
    let v_body = syn::Ident::new("__ncm_body", site);
    Ok(quote! {
        #(#attrs)*
        #vis #defaultness #sig {
            fn __ncm_cache_fn() {}
            let #v_name: &'static str = #fn_name;
            let #v_loader = #loader;
            let #v_key = #key;
            let #v_body = async move #block;
            ::ncm_cache_loader::__private::cached(
                &#v_loader, #v_name, #v_key, #ttl, #strategy, #mode, #v_body,
            )
            .await
        }
    })
}

/// A generic function has one name for every instantiation: `get::<User>(1)` and
/// `get::<Order>(1)` would share a key. Refused unless `key = ...` tells them apart.
fn reject_unkeyed_generics(sig: &Signature, opts: &Options, name: &str) -> syn::Result<()> {
    if opts.key.is_some() {
        return Ok(());
    }
    let generic = sig
        .generics
        .params
        .iter()
        .find(|p| matches!(p, syn::GenericParam::Type(_) | syn::GenericParam::Const(_)));
    match generic {
        Some(param) => Err(syn::Error::new(
            param.span(),
            format!(
                "#[{name}] on a generic function: every instantiation would share one cache \
                 key (`{f}::<A>(1)` and `{f}::<B>(1)` read each other's values). Give a \
                 `key = ...` that tells them apart, e.g. key = format!(\"{{}}:{{id}}\", \
                 std::any::type_name::<T>()), or make the function non-generic",
                f = sig.ident
            ),
        )),
        None => Ok(()),
    }
}

/// Picks how the return value is cached. By default from its type, whatever name it is written
/// with (an alias included), through `__private::Probe`: `Result<T, E>` caches `Ok` only (and
/// shares a failure with the callers that waited on it when `E: Clone` or
/// `E: From<CacheError>`); `Option<T>` caches `Some` (and `None` with `cache_none = true`);
/// any other owned type is cached as is. `mode = result | option | value` forces one.
fn output_mode(sig: &Signature, opts: &Options, name: &str) -> syn::Result<TokenStream> {
    let ty = match &sig.output {
        ReturnType::Default => {
            return Err(syn::Error::new(
                sig.ident.span(),
                format!(
                    "#[{name}] caches the function's return value, but this function returns \
                     nothing; return the value to cache (e.g. `-> Result<T, E>`)"
                ),
            ));
        }
        ReturnType::Type(_, ty) => &**ty,
    };
    let last_ident = match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.to_string()),
        Type::Tuple(t) if t.elems.is_empty() => {
            return Err(syn::Error::new(
                ty.span(),
                format!("#[{name}]: a function returning `()` has nothing to cache"),
            ));
        }
        Type::ImplTrait(_) => {
            return Err(syn::Error::new(
                ty.span(),
                format!(
                    "#[{name}] cannot cache an `impl Trait` return value; return a concrete \
                     type that implements Serialize + DeserializeOwned"
                ),
            ));
        }
        Type::Reference(_) => {
            return Err(syn::Error::new(
                ty.span(),
                format!(
                    "#[{name}] cannot cache a borrowed return value; return an owned type \
                     (e.g. `String` instead of `&str`)"
                ),
            ));
        }
        _ => None,
    };
    // `-> R` for a type parameter `R`: its type is only known per instantiation, and the mode
    // is picked once here; `R = Result<..>` would then cache errors.
    if let Type::Path(p) = ty
        && opts.mode.is_none()
        && let Some(ident) = p.path.get_ident()
        && sig.generics.type_params().any(|t| t.ident == *ident)
    {
        return Err(syn::Error::new(
            ty.span(),
            format!(
                "#[{name}]: the return type is the type parameter `{ident}`, so what to cache \
                 cannot be told from it; add `mode = result`, `mode = option` or `mode = value`"
            ),
        ));
    }
    let mode = opts.mode.as_ref().map(|m| (m.to_string(), m.span()));
    let is_option = match &mode {
        Some((m, _)) => m == "option",
        None => last_ident.as_deref() == Some("Option"),
    };
    if let Some(flag) = opts.cache_none.as_ref().filter(|_| !is_option) {
        return Err(syn::Error::new(
            flag.span(),
            "`cache_none` applies only to functions returning `Option<T>` (behind a type \
             alias, add `mode = option`)",
        ));
    }
    let private = quote!(::ncm_cache_loader::__private);
    if opts.cache_none.as_ref().is_some_and(|b| b.value) {
        return Ok(quote!(#private::OptionCacheNoneMode));
    }
    Ok(match mode {
        Some((m, _)) if m == "option" => quote!(#private::OptionMode),
        Some((m, _)) if m == "value" => quote!(#private::PlainMode),
        Some((_, span)) => quote_spanned! {span=> {
            #[allow(unused_imports)]
            // All tiers in scope: a non-`Result` output then fails on `result_probe` alone.
            use #private::{Tier0 as _, Tier1 as _, Tier2 as _, Tier3 as _, Tier4 as _, Tier5 as _};
            (&&&&&&#private::result_probe::<#ty>()).__ncm_mode()
        }},
        None => quote! {{
            #[allow(unused_imports)]
            use #private::{Tier0 as _, Tier1 as _, Tier2 as _, Tier3 as _, Tier4 as _, Tier5 as _};
            (&&&&&&#private::Probe::<#ty>::new()).__ncm_mode()
        }},
    })
}

/// Whether `ty` is a hash-ordered set (`HashSet`, `FxHashSet`, `AHashSet`, by its last path
/// segment): `Some(true)` behind a reference, `Some(false)` owned, `None` otherwise.
fn hash_set(ty: &Type) -> Option<bool> {
    let (ty, by_ref) = match ty {
        Type::Reference(r) => (&*r.elem, true),
        other => (other, false),
    };
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    matches!(
        last.ident.to_string().as_str(),
        "HashSet" | "FxHashSet" | "AHashSet"
    )
    .then_some(by_ref)
}
