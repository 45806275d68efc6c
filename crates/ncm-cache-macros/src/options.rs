//! Parsing the attribute's options: `loader = .., ttl = .., strategy = .., key = .., name = ..,
//! cache_none = ..`.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitBool, LitStr};

/// The strategies a loader understands, as spelled in `ncm_cache_core::CacheStrategy`.
const STRATEGIES: [(&str, &str); 5] = [
    ("CacheAside", "cache_aside"),
    ("ReadThrough", "read_through"),
    ("WriteThrough", "write_through"),
    ("WriteBehind", "write_behind"),
    ("WriteAround", "write_around"),
];

const OPTIONS: &str = "loader, ttl, strategy, key, name, cache_none, mode";

/// The options of one `#[cache_loader(..)]` / `#[cache_method(..)]`.
pub(crate) struct Options {
    /// The `CacheLoader` expression (required).
    pub(crate) loader: Option<Expr>,
    /// Tokens of an `Option<Duration>` expression.
    pub(crate) ttl: TokenStream,
    /// Tokens of an `Option<CacheStrategy>` expression.
    pub(crate) strategy: TokenStream,
    /// A custom key expression (anything `Display`).
    pub(crate) key: Option<Expr>,
    /// A fixed loader name.
    pub(crate) name: Option<LitStr>,
    /// Whether `None` results are cached (`Option` returns only).
    pub(crate) cache_none: Option<LitBool>,
    /// How the output is cached when its type does not say (`result`, `option`, `value`).
    pub(crate) mode: Option<syn::Ident>,
}

impl Options {
    /// Parses the attribute arguments.
    pub(crate) fn parse(attr: TokenStream, macro_name: &str) -> syn::Result<Self> {
        let mut opts = Options {
            loader: None,
            ttl: quote!(::core::option::Option::None),
            strategy: quote!(::core::option::Option::None),
            key: None,
            name: None,
            cache_none: None,
            mode: None,
        };
        let parser = syn::meta::parser(|meta| {
            let Some(ident) = meta.path.get_ident() else {
                return Err(meta.error(format!(
                    "unknown option `{}`; expected one of: {OPTIONS}",
                    meta.path.to_token_stream()
                )));
            };
            match ident.to_string().as_str() {
                "loader" => opts.loader = Some(meta.value()?.parse()?),
                "cache" => {
                    return Err(meta.error(
                        "`cache` is not an option: pass a CacheLoader with `loader = ...` \
                         (wrap a cache with `CacheLoader::new(cache)`)",
                    ));
                }
                "ttl" => opts.ttl = ttl_tokens(&meta.value()?.parse()?)?,
                "strategy" => opts.strategy = strategy_tokens(&meta.value()?.parse()?)?,
                "key" => opts.key = Some(meta.value()?.parse()?),
                "name" => {
                    let name: LitStr = meta.value()?.parse()?;
                    if name.value().is_empty() {
                        return Err(syn::Error::new(name.span(), "`name` must not be empty"));
                    }
                    opts.name = Some(name);
                }
                "cache_none" => opts.cache_none = Some(meta.value()?.parse()?),
                "mode" => {
                    let value = meta.value()?;
                    let mode: syn::Ident = match value.parse::<LitStr>() {
                        Ok(s) => syn::Ident::new(&s.value(), s.span()),
                        Err(_) => value.parse()?,
                    };
                    if !["result", "option", "value"].contains(&mode.to_string().as_str()) {
                        return Err(syn::Error::new(
                            mode.span(),
                            format!(
                                "unknown mode `{mode}`; expected `result` (cache `Ok` only), \
                                 `option` (cache `Some` only) or `value` (cache whatever is \
                                 returned)"
                            ),
                        ));
                    }
                    opts.mode = Some(mode);
                }
                other => {
                    return Err(meta.error(format!(
                        "unknown option `{other}`; expected one of: {OPTIONS}"
                    )));
                }
            }
            Ok(())
        });
        syn::parse::Parser::parse2(parser, attr)?;
        if opts.loader.is_none() {
            return Err(syn::Error::new(
                Span::call_site(),
                format!(
                    "#[{macro_name}] needs `loader = ...`: the CacheLoader to cache through, \
                     e.g. #[{macro_name}(loader = LOADER, ttl = \"1h\")]"
                ),
            ));
        }
        Ok(opts)
    }
}

/// `ttl = "1h"` / `ttl = 1800` / `ttl = 0.5` / `ttl = some_duration_expr`.
fn ttl_tokens(expr: &Expr) -> syn::Result<TokenStream> {
    let dur = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => parse_duration(&s.value()).map_err(|why| {
            syn::Error::new(
                s.span(),
                format!(
                    "invalid ttl {:?}: {why}; use seconds (3600) or a duration string such as \
                     \"500ms\", \"30s\", \"30m\", \"1h\" or \"1h 30m\"",
                    s.value()
                ),
            )
        })?,
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => {
            let secs: u64 = i.base10_parse()?;
            (u128::from(secs)) * 1_000_000_000
        }
        Expr::Lit(ExprLit {
            lit: Lit::Float(f), ..
        }) => {
            let secs: f64 = f.base10_parse()?;
            if !(0.0..=1e12).contains(&secs) {
                return Err(syn::Error::new(f.span(), "ttl seconds out of range"));
            }
            (secs * 1e9) as u128
        }
        Expr::Lit(other) => {
            return Err(syn::Error::new(
                other.span(),
                "ttl must be seconds (1800), a duration string (\"30m\") or a Duration expression",
            ));
        }
        // Any other expression must be a `Duration`, checked by the type system.
        other => {
            return Ok(quote_spanned! {other.span()=>
                ::core::option::Option::Some(::ncm_cache_loader::__private::ttl(#other))
            });
        }
    };
    if dur == 0 {
        return Err(syn::Error::new(
            expr.span(),
            "ttl must be greater than zero (leave `ttl` out to use the loader's default TTL)",
        ));
    }
    let secs = u64::try_from(dur / 1_000_000_000)
        .map_err(|_| syn::Error::new(expr.span(), "ttl is too large"))?;
    let nanos = (dur % 1_000_000_000) as u32;
    Ok(quote!(::core::option::Option::Some(::core::time::Duration::new(#secs, #nanos))))
}

/// `strategy = ReadThrough` / `CacheStrategy::ReadThrough` / `"read_through"` / an expression.
fn strategy_tokens(expr: &Expr) -> syn::Result<TokenStream> {
    let variant = |name: &str, span: Span| -> syn::Result<TokenStream> {
        let found = STRATEGIES
            .iter()
            .find(|(camel, snake)| *camel == name || *snake == name);
        match found {
            Some(("WriteThrough", _)) => Err(syn::Error::new(
                span,
                "WriteThrough is a write strategy (use CacheStrategies::write_through for \
                 writes); a cached function takes CacheAside (the default: a failing cache is \
                 skipped), ReadThrough (a failing cache fails the call), WriteBehind (the \
                 result is cached in the background) or WriteAround (results are not cached)",
            )),
            Some((camel, _)) => {
                let ident = syn::Ident::new(camel, span);
                Ok(quote!(::core::option::Option::Some(
                    ::ncm_cache_loader::__private::CacheStrategy::#ident
                )))
            }
            None => Err(syn::Error::new(
                span,
                format!(
                    "unknown strategy `{name}`; expected one of CacheAside, ReadThrough, \
                     WriteBehind, WriteAround"
                ),
            )),
        }
    };
    match expr {
        // A bare variant (`ReadThrough`) is checked here and qualified; a path the user wrote
        // (`CacheStrategy::ReadThrough`) or a constant (`DEFAULT_STRATEGY`) is kept as is, so
        // their import is used.
        Expr::Path(p) if p.qself.is_none() && p.path.segments.len() == 1 => {
            let name = p
                .path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect::<String>();
            let is_constant = name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if is_constant {
                Ok(quote_spanned!(p.span()=> ::core::option::Option::Some(#p)))
            } else {
                variant(&name, p.span())
            }
        }
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => variant(&s.value(), s.span()),
        other => Ok(quote_spanned!(other.span()=> ::core::option::Option::Some(#other))),
    }
}

/// Parses `"90"`, `"1.5"`, `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"2d"`, `"1h 30m"` into
/// nanoseconds (the subset of `humantime` that `ncm_cache_core::parse_duration` accepts).
pub(crate) fn parse_duration(text: &str) -> Result<u128, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(u128::from(secs) * 1_000_000_000);
    }
    if let Ok(secs) = text.parse::<f64>() {
        if !(0.0..=1e12).contains(&secs) {
            return Err("seconds out of range".into());
        }
        return Ok((secs * 1e9) as u128);
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let (number, tail) = rest.split_at(digits);
        let number: u128 = number.parse().map_err(|_| "number too large".to_string())?;
        let tail = tail.trim_start();
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" | "nsec" => 1,
            "us" | "µs" | "usec" => 1_000,
            "ms" | "msec" | "millis" => 1_000_000,
            "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000_000_000,
            "d" | "day" | "days" => 86_400_000_000_000,
            "w" | "week" | "weeks" => 604_800_000_000_000,
            "" => return Err(format!("missing unit after {number}")),
            other => return Err(format!("unknown unit {other:?}")),
        };
        total = number
            .checked_mul(scale)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| "duration too large".to_string())?;
        rest = tail.trim_start();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_parse_like_the_runtime_parser() {
        let s = 1_000_000_000u128;
        assert_eq!(parse_duration("1h"), Ok(3600 * s));
        assert_eq!(parse_duration("30m"), Ok(1800 * s));
        assert_eq!(parse_duration("90"), Ok(90 * s));
        assert_eq!(parse_duration("0.5"), Ok(s / 2));
        assert_eq!(parse_duration("1h 30m"), Ok(5400 * s));
        assert_eq!(parse_duration("1h30m"), Ok(5400 * s));
        assert_eq!(parse_duration("500ms"), Ok(s / 2));
        assert_eq!(parse_duration("2 hours"), Ok(7200 * s));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1 fortnight").is_err());
        assert!(parse_duration("5").is_ok());
        assert!(parse_duration("").is_err());
    }
}
