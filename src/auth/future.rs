use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::reject::ResponseBody;

/// The boxed step of a cache miss: reads the store, then either calls the inner service
/// (yielding its future) or yields the rejection.
type Resolving<F, B> =
    Pin<Box<dyn Future<Output = Result<F, Response<ResponseBody<B>>>> + Send + 'static>>;

pin_project! {
    /// Response future for [`ApiKeyAuth`](super::ApiKeyAuth).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Inner { #[pin] fut: F },
        Resolving { fut: Resolving<F, B> },
        Rejected { response: Option<Response<ResponseBody<B>>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn inner(fut: F) -> Self {
        ResponseFuture {
            state: State::Inner { fut },
        }
    }
    pub(crate) fn resolving(fut: Resolving<F, B>) -> Self {
        ResponseFuture {
            state: State::Resolving { fut },
        }
    }
    pub(crate) fn rejected(response: Response<ResponseBody<B>>) -> Self {
        ResponseFuture {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { fut } => {
                    let res = ready!(fut.poll(cx))?;
                    return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                }
                StateProj::Resolving { fut } => match ready!(fut.as_mut().poll(cx)) {
                    Ok(inner) => this.state.set(State::Inner { fut: inner }),
                    Err(rejection) => return Poll::Ready(Ok(rejection)),
                },
                StateProj::Rejected { response } => {
                    let res = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(res));
                }
            }
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}
